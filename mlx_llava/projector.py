"""The projection from CLIP features to the language model's embedding space.

LLaVA v1 uses one linear map (the paper's projection matrix W); LLaVA-1.5 a two-layer MLP with a
GELU (`multi_modal_projector.linear_1 -> act -> linear_2`).
"""

import mlx.core as mx
import mlx.nn as nn

from .activations import get_activation
from .config import ModelConfig


class MultiModalProjector(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        in_dim = config.vision_config.hidden_size * len(config.feature_layers)
        out_dim = config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        if config.projector_type == "mlp2x_gelu":
            self.act = get_activation(config.projector_hidden_act)
            self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def __call__(self, features: mx.array) -> mx.array:
        """features [n, tokens, D_vision * n_layers] -> [n, tokens, D_text]."""
        x = self.linear_1(features)
        if "linear_2" in self:
            x = self.linear_2(self.act(x))
        return x
