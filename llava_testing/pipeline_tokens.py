"""Run under `mlx.launch` by the tests: does every rank of a pipeline pick the same tokens?

`python -m llava_testing.pipeline_tokens MODEL PICTURE` loads MODEL split across the ranks,
samples an answer without a seed (temperature 1) and prints, on rank 0, one JSON line: each
rank's token ids. Ranks that sampled differently would feed their own tokens to their layers.
"""

from __future__ import annotations

import json
import sys

from mlx_llava import distributed, load, stream_generate


def main(model_path: str, picture: str) -> None:
    model, processor = load(model_path, pipeline=True)
    prompt = processor.format_prompt("What is it?")
    tokens = [
        r.token
        for r in stream_generate(
            model, processor, prompt, image=picture, max_tokens=12, temperature=1.0
        )
    ]
    gathered = distributed.gather(tokens)
    if distributed.is_main():
        print(json.dumps(gathered))


if __name__ == "__main__":
    main(*sys.argv[1:])
