"""The language model: mlx-lm's Llama, whose decoder layers can be split across ranks.

Pipeline parallelism follows mlx-lm's pipelined models (`models/pipeline.py`'s `PipelineMixin`,
as its Qwen2 uses it): the layers are split in reverse, so rank 0 holds the last ones and rank
N-1 the first; rank r receives the hidden states from rank r+1, runs its layers and sends the
result to rank r-1 (`mx.distributed.send` / `recv_like`); `all_gather` then hands rank 0's final
hidden states to every rank, so that all compute the same logits and pick the same next token.
Unsplit (one process), it computes exactly what mlx-lm's Llama does.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.pipeline import PipelineMixin


class LlamaModel(llama.LlamaModel, PipelineMixin):
    """mlx-lm's LlamaModel (same parameters and names) with `PipelineMixin.pipeline(group)`."""

    def __init__(self, args: llama.ModelArgs):
        super().__init__(args)
        PipelineMixin.__init__(self)  # nn.Module's __init__ does not call on to the mixin's

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        """inputs [B, L] (or input_embeddings [B, L, D]) -> final hidden states [B, L, D].

        On a rank that holds later layers the embeddings only give `recv_like` its shape.
        """
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        layers = self.pipeline_layers
        if cache is None:
            cache = [None] * len(layers)
        masks = {}
        for layer, c in zip(layers, cache):
            if layer.use_sliding not in masks:
                window = self.sliding_window if layer.use_sliding else None
                masks[layer.use_sliding] = create_attention_mask(h, c, window_size=window)

        rank, size = self.pipeline_rank, self.pipeline_size
        if rank < size - 1:
            h = mx.distributed.recv_like(h, rank + 1)
        for layer, c in zip(layers, cache):
            h = layer(h, masks[layer.use_sliding], cache=c)
        if rank > 0:
            h = mx.distributed.send(h, rank - 1)
            if cache[-1] is not None:  # evaluating the cache (prefill) sends the states
                cache[-1].keys = mx.depends(cache[-1].keys, h)
        if size > 1:  # rank 0's states to every rank, kept in the graph
            h = mx.distributed.all_gather(h)[: h.shape[0]]
        return self.norm(h)

    @property
    def layer_range(self) -> range:
        """The indices of the decoder layers this rank holds."""
        end = len(self.layers) if self.end_idx is None else self.end_idx
        return range(self.start_idx, end)


class LanguageModel(llama.Model):
    """mlx-lm's `llama.Model` around the splittable `LlamaModel`."""

    def __init__(self, args: llama.ModelArgs):
        super().__init__(args)
        # mlx-lm's own LlamaModel is replaced before its (lazy) weights are ever computed.
        self.model = LlamaModel(args)

    @property
    def layers(self) -> list:
        """The decoder layers this rank runs (the KV cache is made for these)."""
        return self.model.pipeline_layers
