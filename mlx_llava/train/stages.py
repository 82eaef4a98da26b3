"""What a stage trains and how: the template, the trainable modules, LoRA, activation
checkpointing, the learning-rate schedule and the loss."""

from __future__ import annotations

import math
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_unflatten

from ..config import ModelConfig
from ..conversation import Template, get_template
from ..distributed import main_print
from ..model import Model, merge_image_features
from .args import DEFAULT_CONV_MODE, ONEVISION_CONV_MODE, TrainArgs


def log(message: str) -> None:
    """A line on stderr, from rank 0 only when `mlx.launch` runs several ranks."""
    main_print(message)


def conversation_template(args: TrainArgs, config: ModelConfig) -> Template:
    """`plain` for stage 1; for stage 2 `--conv-mode`, else the model's own template unless it
    cannot teach `</s>` (`plain`; llava-hf's Jinja, which ends answers with a space), else
    `vicuna_v1` (OneVision, whose decoder is Qwen2: `chatml`).
    """
    if args.stage == "pretrain":
        if args.conv_mode not in (None, "plain"):
            raise ValueError("stage 1 (pretrain) trains with the plain template")
        return get_template("plain")
    if args.conv_mode:
        if get_template(args.conv_mode).sep2 == " ":
            log(
                f"warning: {args.conv_mode} ends answers with a space, not </s>: the model will "
                "not learn to stop"
            )
        return get_template(args.conv_mode)
    mode = config.conv_mode
    if mode in (None, "plain", "llava_hf"):
        onevision = config.model_type == "llava_onevision"
        mode = ONEVISION_CONV_MODE if onevision else DEFAULT_CONV_MODE
    return get_template(mode)


def set_trainable(model: Model, args: TrainArgs) -> None:
    """Freeze all, then unfreeze what the stage trains (adding LoRA layers for `--lora`)."""
    model.freeze()
    if args.stage == "finetune":
        if args.lora:
            from mlx_lm.tuner.utils import linear_to_lora_layers

            lm = model.language_model
            config = {"rank": args.lora_rank, "scale": args.lora_scale, "dropout": 0.0}
            linear_to_lora_layers(lm, len(lm.layers), config)
        else:
            model.language_model.unfreeze()
        if args.train_vision:
            model.vision_tower.unfreeze()
    model.multi_modal_projector.unfreeze()


def fuse_lora(model: Model) -> None:
    """Replace LoRA layers by plain linear layers holding W + scale * B A."""
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))


_CHECKPOINTED: dict[type, type] = {}


def checkpoint_layers(layers: list) -> None:
    """Recompute these layers' activations in the backward pass (`mx.checkpoint`).

    Only these instances change: each gets a subclass whose `__call__` is checkpointed, so other
    models of the same class in the process are untouched (unlike mlx-lm's `grad_checkpoint`).
    """
    for layer in layers:
        cls = type(layer)
        if cls in _CHECKPOINTED.values():
            continue
        if cls not in _CHECKPOINTED:
            call = cls.__call__

            def checkpointed(self, *args, _call=call, **kwargs):
                def inner(params, *args, **kwargs):
                    self.update(params)
                    return _call(self, *args, **kwargs)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

            _CHECKPOINTED[cls] = type(
                f"Checkpointed{cls.__name__}", (cls,), {"__call__": checkpointed}
            )
        layer.__class__ = _CHECKPOINTED[cls]


def make_schedule(learning_rate: float, total: int, warmup_ratio: float) -> Callable:
    """Linear warmup over ceil(ratio * total) steps, then cosine decay to 0 at `total`
    (transformers' `get_cosine_schedule_with_warmup`, as LLaVA trains)."""
    warmup = math.ceil(total * warmup_ratio)
    cosine = optim.cosine_decay(learning_rate, max(total - warmup, 1), 0.0)
    if warmup == 0:
        return cosine
    return optim.join_schedules(
        [optim.linear_schedule(0.0, learning_rate, warmup), cosine], [warmup]
    )


def input_embeddings(
    model: Model,
    inputs: mx.array,
    pixel_values: Optional[mx.array],
    image_sizes: Optional[list[tuple[int, int]]] = None,
    videos: Optional[list[mx.array]] = None,
) -> mx.array:
    """Embeddings [B, L, D] of a batch's ids [B, L] with its pictures and videos (`videos`:
    runs of equal frame count, [V, F, H, W, 3] each, in the order of their tokens)."""
    embeddings = model.get_input_embeddings(inputs, pixel_values, image_sizes)
    if videos:
        D = embeddings.shape[-1]
        features = mx.concatenate([model.get_video_features(v).reshape(-1, D) for v in videos])
        video_mask = inputs == model.config.video_token_index
        embeddings = merge_image_features(embeddings, features, video_mask)
    return embeddings


def loss_fn(
    model: Model,
    inputs: mx.array,
    targets: mx.array,
    mask: mx.array,
    pixel_values: Optional[mx.array],
    image_sizes: Optional[list[tuple[int, int]]] = None,
    videos: Optional[list[mx.array]] = None,
) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over the answer tokens of a batch, and their count (`image_sizes`:
    LLaVA-NeXT's, one (height, width) per picture; `videos`: see `input_embeddings`)."""
    embeddings = input_embeddings(model, inputs, pixel_values, image_sizes, videos)
    logits = model(inputs, input_embeddings=embeddings).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    return losses.sum() / mx.maximum(ntoks, 1), ntoks
