"""The ViT vision tower, CLIP or SigLIP: pixels [n, H, W, 3] -> hidden states of the selected
layers.

The two differ only at the ends: CLIP prepends a class token, has no bias on its patch
convolution and normalizes before the encoder (`pre_layrnorm`); SigLIP has none of these. Both
keep `post_layernorm` (loaded, unused: LLaVA reads hidden states of the encoder's layers).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .activations import get_activation
from .config import VisionConfig


class Attention(nn.Module):
    """Bidirectional multi-head attention with biased projections (CLIP)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (dim // self.num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape

        def heads(t):
            return t.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = get_activation(config.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]


class Embeddings(nn.Module):
    """Patch embedding (a stride-patch convolution), learned positions, and CLIP's CLS token."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.is_clip:
            self.class_embedding = mx.zeros((config.hidden_size,))
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            bias=not config.is_clip,
        )
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """pixel_values [n, H, W, C] -> embeddings [n, (1 +) patches, D] (CLS first, CLIP)."""
        patches = self.patch_embedding(pixel_values)
        n, _, _, dim = patches.shape
        x = patches.reshape(n, -1, dim)
        if "class_embedding" in self:
            cls = mx.broadcast_to(self.class_embedding.astype(x.dtype), (n, 1, dim))
            x = mx.concatenate([cls, x], axis=1)
        return x + self.position_embedding.weight[: x.shape[1]]


class VisionTower(nn.Module):
    """CLIPVisionModel or SiglipVisionModel (without SigLIP's head) up to the selected layers:
    `post_layernorm` is kept for loading only."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        if config.is_clip:
            self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, pixel_values: mx.array, layers: list[int]) -> list[mx.array]:
        """Hidden states [n, (1 +) patches, D] at `layers`, indexed like transformers'
        `hidden_states` (0 = embeddings, k = output of layer k, negative from the end).

        Only the layers up to the deepest requested one are computed.
        """
        total = len(self.encoder.layers) + 1
        wanted = [i % total for i in layers]
        x = self.embeddings(pixel_values)
        if "pre_layrnorm" in self:
            x = self.pre_layrnorm(x)
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
            x = layer(x)
            if i in wanted:
                states[i] = x
        return [states[i] for i in wanted]
