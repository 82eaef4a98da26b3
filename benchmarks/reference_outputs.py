"""transformers' outputs on a benchmark checkpoint, for `bench.py --reference`: the last
position's logits and the greedy tokens of the benchmark's prompt and picture.

    python benchmarks/reference_outputs.py --model /tmp/next-mid --out /tmp/next-mid-ref.npz

Needs torch (a venv without mlx-vlm is fine: the file is all bench.py reads). `--model` is the
llava-hf folder that make_checkpoint.py wrote (converted MLX folders hold the same weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from bench import DEFAULT_MAX_TOKENS, QUESTION, make_prompt, synthetic_image  # (a sibling)


def reference_outputs(model_dir: Path, max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mlx_llava import load

    _, ours = load(model_dir, dtype="float32")
    prompt = make_prompt(ours, QUESTION, None)  # the prompt bench.py asks
    image = synthetic_image()
    config = json.loads((model_dir / "config.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_tokens)
    return {
        "model_type": np.array(config["model_type"]),
        "prompt": np.array(prompt),
        "positions": np.array(logits.shape[0]),
        "last_logits": logits[-1].float().numpy(),
        "greedy_tokens": out[0, inputs["input_ids"].shape[1] :].numpy().astype(np.int32),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="the llava-hf checkpoint folder")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    args = p.parse_args(argv)
    np.savez(args.out, **reference_outputs(args.model, args.max_tokens))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
