"""Prepare the demo's training: the stage-2 data mix and the untrained model.

    python scripts/prepare_demo.py --data SHAPES_DIR --out FOLDER

- `SHAPES_DIR/mix.json` (and `mix_val.json`): the shapes-world conversations (many wordings,
  several turns), half of the one-word questions followed by LLaVA-1.5's "Answer the question
  using a single word or phrase.", plus each caption as a one-turn request for a description.
- `FOLDER`: the untrained model, with a tokenizer learned on the shapes-world text and random
  weights, the vision tower's positions starting from 2-D sine-cosine embeddings. The sizes are
  the demo's (see docs/training.md): a 64 px CLIP-style tower with 8 px patches (64 image
  tokens), the LLaVA-1.5 two-layer GELU projector, a small Llama decoder. Its tower is then
  pre-trained by `python -m mlx_llava.train.shapes_tower` before the two LLaVA stages.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from llava_testing.tokenizer_builder import build_tokenizer, default_corpus, pad_vocab_size
from mlx_llava.config import ModelConfig, TextConfig, VisionConfig
from mlx_llava.conversation import render
from mlx_llava.data.shapes import NUMBER_WORDS
from mlx_llava.data.wordings import WORDING_CATEGORIES, ask, wording_split
from mlx_llava.train import init_model_folder

SINGLE_WORD_SUFFIX = "Answer the question using a single word or phrase."
VOCAB_SIZE = 768
VISION = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=64,
    patch_size=8,
)
TEXT = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=512,
)


def shapes_corpus(data: Path) -> list[str]:
    """Captions, rendered conversations, every question asked in training, each training
    wording and the answer words of a shapes-world folder, plus general English from
    `default_corpus`. No held-out wording."""
    pretrain = json.loads((data / "pretrain.json").read_text())
    finetune = json.loads((data / "finetune.json").read_text())
    captions = sorted({r["conversations"][1]["value"] for r in pretrain})
    chats = [  # without "</s>", which is a special token, not text to learn pieces from
        render("vicuna_v1", [(t["from"], t["value"]) for t in r["conversations"]], False).replace(
            "</s>", " "
        )
        for r in finetune[:300]
    ]
    asked = [t["value"].replace("<image>\n", "") for r in finetune for t in r["conversations"][::2]]
    answers = "red green blue yellow circle square triangle left right " + " ".join(NUMBER_WORDS)
    split = wording_split()["train"]
    wordings = [w.text for c in WORDING_CATEGORIES for w in split[c]]
    return captions + chats + asked + wordings + [answers] * 50 + default_corpus(600)


def write_mix(data: Path) -> None:
    """Write mix.json and mix_val.json beside the shapes-world files."""
    rng = random.Random(0)
    for suffix in ("", "_val"):
        records = []
        for r in json.loads((data / f"finetune{suffix}.json").read_text()):
            turns = [dict(t) for t in r["conversations"]]
            for question, answer in zip(turns[::2], turns[1::2]):
                one_word = " " not in answer["value"]
                if one_word and rng.random() < 0.5:
                    question["value"] += "\n" + SINGLE_WORD_SUFFIX
            records.append({**r, "conversations": turns})
        for r in json.loads((data / f"pretrain{suffix}.json").read_text()):
            request = {"from": "human", "value": "<image>\n" + ask(rng, "describe", 1)}
            turns = [request, r["conversations"][1]]
            records.append({**r, "id": r["id"] + "-caption", "conversations": turns})
        with open(data / f"mix{suffix}.json", "w") as f:
            json.dump(records, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="a shapes-world folder")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    write_mix(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(tmp, corpus=shapes_corpus(args.data), vocab_size=VOCAB_SIZE)
        config = ModelConfig(
            vision_config=VisionConfig(**VISION),
            text_config=TextConfig(vocab_size=pad_vocab_size(len(tokenizer)), **TEXT),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            pad_token_id=tokenizer.pad_token_id,
            vision_feature_layer=-1,
            image_aspect_ratio="pad",
            conv_mode="vicuna_v1",
        )
        init_model_folder(args.out, config, tmp, seed=args.seed, sincos_positions=True)
    print(f"wrote {args.data}/mix.json and the untrained demo model to {args.out}")


if __name__ == "__main__":
    main()
