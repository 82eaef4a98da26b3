"""The language model: any mlx-lm decoder, run from input embeddings, whole or as one stage of
a pipeline.

The decoder is mlx-lm's own model for `text_config.model_type` (found by mlx-lm's model-class
lookup: llama, mistral, qwen2, ...), composed, not copied: its inner model (`model`: the token
embeddings, the layers, the final norm) and its `lm_head` keep their checkpoint names.

Pipeline parallelism follows mlx-lm's pipelined models (`models/pipeline.py`): the layers are
split in reverse, so rank 0 holds the last ones and rank N-1 the first; rank r receives the
hidden states from rank r+1, runs mlx-lm's forward over its own layers and sends the result to
rank r-1 (`mx.distributed.send` / `recv_like`); `all_gather` then hands rank 0's final hidden
states to every rank, so that all compute the same logits and pick the same next token.
Unsplit (one process), it is exactly mlx-lm's forward.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

# mlx-lm's own lookup (model_type -> module, with its remapping, e.g. mistral -> llama); a thin
# adapter over a private name of the pinned mlx-lm range.
from mlx_lm.utils import _get_classes


def decoder_classes(model_type: str) -> tuple[type, type]:
    """mlx-lm's (Model, ModelArgs) classes for a text `model_type`."""
    return _get_classes({"model_type": model_type})


class LanguageModel(nn.Module):
    """mlx-lm's decoder for `args["model_type"]`, run from embeddings, splittable by layers.

    Parameters: `model.*` (mlx-lm's inner model) and `lm_head.weight` unless the embeddings
    are tied.
    """

    def __init__(self, args: dict):
        super().__init__()
        model_class, args_class = decoder_classes(args["model_type"])
        decoder = model_class(args_class.from_dict(args))
        self.args = decoder.args
        self.decoder_class = model_class
        self.model = decoder.model
        if "lm_head" in decoder:
            self["lm_head"] = decoder["lm_head"]
        self.pipeline_rank, self.pipeline_size = 0, 1
        self.start_idx, self.end_idx = 0, len(self.model.layers)

    @property
    def lm_head(self) -> Callable[[mx.array], mx.array]:
        """Final hidden states [..., D] -> logits [..., vocab]: the output projection, or the
        token embeddings' transpose when they are tied."""
        if "lm_head" in self:
            return self["lm_head"]
        return self.model.embed_tokens.as_linear

    @property
    def layers(self) -> list:
        """The decoder layers this rank runs (the KV cache is made for these)."""
        return self.model.layers[self.start_idx : self.end_idx]

    @property
    def layer_range(self) -> range:
        """The indices of the decoder layers this rank holds."""
        return range(self.start_idx, self.end_idx)

    def pipeline(self, group: mx.distributed.Group) -> None:
        """Keep only this rank's layers (evenly split, the low ranks get the extra layers;
        rank 0 the last ones). The others become None, so the layers keep their numbers."""
        if len(set(getattr(self.args, "layer_types", None) or [None])) > 1:
            # mlx-lm picks each kind's mask by a layer index of the whole model.
            raise ValueError("a decoder with layers of several attention kinds cannot be split")
        rank, size = group.rank(), group.size()
        base, extra = divmod(len(self.model.layers), size)
        split = [base + (1 if r < extra else 0) for r in range(size)]
        self.pipeline_rank, self.pipeline_size = rank, size
        self.start_idx = sum(split[rank + 1 :])
        self.end_idx = self.start_idx + split[rank]
        layers = self.model.layers
        self.model.layers = [None] * self.start_idx + layers[self.start_idx : self.end_idx]

    def stage(self) -> nn.Module:
        """mlx-lm's inner model as this rank runs it: a shallow view holding this rank's layers,
        with the final norm on the last stage (rank 0) only."""
        if self.pipeline_size == 1:
            return self.model
        stage = copy.copy(self.model)
        stage.layers = self.layers
        if self.pipeline_rank > 0:
            stage.norm = nn.Identity()
        return stage

    def __call__(
        self,
        inputs: Optional[mx.array],
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        """inputs [B, L] (or input_embeddings [B, L, D]) -> final hidden states [B, L, D].

        On a rank that holds later layers the embeddings only give `recv_like` its shape.
        """
        h = self.model.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        rank, size = self.pipeline_rank, self.pipeline_size
        if rank < size - 1:
            h = mx.distributed.recv_like(h, rank + 1)
        h = self.stage()(None, cache, input_embeddings=h)
        if rank > 0:
            h = mx.distributed.send(h, rank - 1)
            if cache is not None and cache[-1] is not None:  # evaluating the cache sends
                cache[-1].keys = mx.depends(cache[-1].keys, h)
        if size > 1:  # rank 0's states to every rank, kept in the graph
            h = mx.distributed.all_gather(h)[: h.shape[0]]
        return h

    def make_cache(self) -> list[Any]:
        """The decoder's own KV caches (mlx-lm's `make_cache`, if it has one) for this rank's
        layers, else one `KVCache` per layer."""
        if hasattr(self.decoder_class, "make_cache"):
            return self.decoder_class.make_cache(self)  # reads `self.layers`, `self.model`
        return [KVCache() for _ in self.layers]
