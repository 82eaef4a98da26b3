"""Activation functions by the names checkpoints use (`hidden_act`, `projector_hidden_act`)."""

import mlx.core as mx
import mlx.nn as nn


def quick_gelu(x: mx.array) -> mx.array:
    """CLIP's GELU approximation, x * sigmoid(1.702 x)."""
    return x * mx.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": nn.gelu,  # exact (erf) GELU, as torch.nn.GELU()
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "relu": nn.relu,
    "silu": nn.silu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}' (choose from: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]
