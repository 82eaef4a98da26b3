"""Configurations that read llava-hf `config.json` files field for field.

Each dataclass uses the checkpoint's own field names and the reference library's defaults
(transformers' `CLIPVisionConfig`, `LlamaConfig`, `MistralConfig`, `LlavaConfig`,
`LlavaNextConfig`), so that sparse configs such as llava-hf/llava-1.5-7b-hf's (which leaves every
Llama size to the defaults) mean the same thing here.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from . import anyres


class ConfigError(ValueError):
    """A config that does not describe a model we can build."""


def is_original_config(config: dict) -> bool:
    """Original haotian-liu/LLaVA configs carry `mm_*` keys (`mm_vision_tower`,
    `mm_hidden_size`, ...); their `model_type` says "llava" as llava-hf's does."""
    return any(k.startswith("mm_") for k in config)


def _known_fields(cls, params: dict) -> dict:
    names = inspect.signature(cls).parameters
    return {k: v for k, v in params.items() if k in names}


@dataclass
class VisionConfig:
    """CLIP ViT vision tower (`vision_config`); defaults are LlavaConfig's CLIP ViT-L/14-336."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    model_type: str = "clip_vision_model"

    @classmethod
    def from_dict(cls, params: dict) -> "VisionConfig":
        return cls(**_known_fields(cls, params))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1


# transformers' MistralConfig defaults where they differ from LlamaConfig's (Mistral-7B's sizes).
MISTRAL_DEFAULTS = dict(
    intermediate_size=14336,
    num_key_value_heads=8,
    max_position_embeddings=4096 * 32,
    rms_norm_eps=1e-6,
    sliding_window=4096,
)


@dataclass
class TextConfig:
    """Llama / Vicuna / Yi or Mistral decoder (`text_config`); defaults are transformers'
    LlamaConfig (a sparse Mistral config gets MistralConfig's, see `from_dict`)."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    rope_parameters: Optional[dict] = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type not in ("llama", "mistral"):
            raise ConfigError(
                f"text model type '{self.model_type}' is not supported (llama, mistral)"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"text hidden_act '{self.hidden_act}' is not supported (silu)")
        # transformers 5 writes `rope_parameters` instead of `rope_theta` / `rope_scaling`.
        if self.rope_parameters:
            params = dict(self.rope_parameters)
            self.rope_theta = float(params.pop("rope_theta", self.rope_theta))
            if params.get("rope_type", "default") != "default":
                self.rope_scaling = params
            self.rope_parameters = None
        # Mistral attends to the last `sliding_window` positions only; within that many
        # positions this is ordinary causal attention, so the usable context stops there.
        if self.sliding_window is not None:
            self.max_position_embeddings = min(self.max_position_embeddings, self.sliding_window)

    @classmethod
    def from_dict(cls, params: dict) -> "TextConfig":
        if params.get("model_type") == "mistral":
            params = {**MISTRAL_DEFAULTS, **params}
        return cls(**_known_fields(cls, params))

    def to_mlx_lm_args(self) -> dict:
        """The arguments of mlx-lm's `llama.ModelArgs`."""
        return dict(
            model_type="llama",
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            tie_word_embeddings=self.tie_word_embeddings,
        )


@dataclass
class ModelConfig:
    """The whole LLaVA model (`LlavaConfig`, or `LlavaNextConfig` when `model_type` is
    "llava_next"), plus the fields original checkpoints need.

    `projector_type` is "mlp2x_gelu" (LLaVA-1.5, llava-hf) or "linear" (LLaVA v1's projection
    matrix W). `image_aspect_ratio` ("pad" or "square"; "anyres" for LLaVA-NeXT, whose pictures
    are tiled along `image_grid_pinpoints`) and `conv_mode` are recorded by the converter so
    that generation preprocesses and templates as the checkpoint was trained.
    """

    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    model_type: str = "llava"
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    projector_type: str = "mlp2x_gelu"
    multimodal_projector_bias: bool = True
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: Union[int, list[int]] = -2
    image_grid_pinpoints: Optional[list[list[int]]] = None
    image_aspect_ratio: Optional[str] = None
    conv_mode: Optional[str] = None
    pad_token_id: Optional[int] = None
    quantization: Optional[dict] = None

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        if isinstance(self.text_config, dict):
            self.text_config = TextConfig.from_dict(self.text_config)
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(
                "vision_feature_select_strategy must be 'default' or 'full', got "
                f"'{self.vision_feature_select_strategy}'"
            )
        if self.projector_type not in ("mlp2x_gelu", "linear"):
            raise ConfigError(
                f"unknown projector type '{self.projector_type}' (mlp2x_gelu, linear)"
            )
        if self.model_type not in ("llava", "llava_next"):
            raise ConfigError(f"not a LLaVA checkpoint (model_type '{self.model_type}')")
        if self.is_next:
            self._check_next()
        elif self.image_aspect_ratio is None:
            self.image_aspect_ratio = "square"
        elif self.image_aspect_ratio not in ("pad", "square"):
            raise ConfigError(
                f"image_aspect_ratio '{self.image_aspect_ratio}' is not supported (pad, square)"
            )
        layers = self.feature_layers
        n = self.vision_config.num_hidden_layers
        if any(not -n - 1 <= i <= n for i in layers):
            raise ConfigError(f"vision_feature_layer {self.vision_feature_layer} out of range")

    def _check_next(self) -> None:
        """LLaVA-NeXT's settings: pinpoints (LlavaNextConfig's default when absent) that are
        whole tiles, the CLS dropped (transformers' packing cannot place it), an MLP projector."""
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = [list(p) for p in anyres.DEFAULT_PINPOINTS]
        tile = self.vision_config.image_size
        pinpoints = self.image_grid_pinpoints
        if not pinpoints or any(
            len(p) != 2 or min(p) < tile or p[0] % tile or p[1] % tile for p in pinpoints
        ):
            raise ConfigError(
                f"image_grid_pinpoints {pinpoints} must be (height, width) pairs of whole "
                f"{tile}-pixel tiles"
            )
        self.image_grid_pinpoints = [[int(h), int(w)] for h, w in pinpoints]
        if self.image_aspect_ratio is None:
            self.image_aspect_ratio = "anyres"
        if self.image_aspect_ratio != "anyres":
            raise ConfigError(
                f"LLaVA-NeXT tiles its pictures: image_aspect_ratio '{self.image_aspect_ratio}' "
                "is not supported (anyres)"
            )
        if self.vision_feature_select_strategy != "default":
            raise ConfigError(
                "LLaVA-NeXT needs vision_feature_select_strategy 'default' (the CLS dropped)"
            )
        if self.projector_type != "mlp2x_gelu":
            raise ConfigError("LLaVA-NeXT needs the mlp2x_gelu projector")

    @classmethod
    def from_dict(cls, params: dict) -> "ModelConfig":
        """Build from a llava-hf (or our converted) config.json; unknown keys are ignored."""
        params = dict(params)
        if is_original_config(params):
            raise ConfigError(
                "this is an original haotian-liu LLaVA checkpoint: convert it first with "
                "convert.py --hf-path ... --mlx-path ..."
            )
        if params.get("model_type", "llava") not in ("llava", "llava_next"):
            raise ConfigError(f"not a LLaVA checkpoint (model_type '{params['model_type']}')")
        # transformers >= 4.45 spells it image_token_id.
        if "image_token_index" not in params and "image_token_id" in params:
            params["image_token_index"] = params["image_token_id"]
        text = dict(params.get("text_config") or {})
        # Old llava-hf configs keep the padded vocabulary at the top level only.
        if "vocab_size" not in text and "vocab_size" in params:
            text["vocab_size"] = params["vocab_size"]
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in params:
            text["tie_word_embeddings"] = params["tie_word_embeddings"]
        params["text_config"] = TextConfig.from_dict(text)
        params["vision_config"] = VisionConfig.from_dict(params.get("vision_config") or {})
        return cls(**_known_fields(cls, params))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out = {k: v for k, v in out.items() if v is not None}
        # sliding_window stays even when null: absent, a Mistral config means MistralConfig's 4096.
        out["text_config"] = {
            k: v for k, v in out["text_config"].items() if v is not None or k == "sliding_window"
        }
        out["architectures"] = [
            "LlavaNextForConditionalGeneration" if self.is_next else "LlavaForConditionalGeneration"
        ]
        return out

    @property
    def is_next(self) -> bool:
        """LLaVA-NeXT (1.6): pictures tiled at any resolution, `image_newline` after each row."""
        return self.model_type == "llava_next"

    @property
    def feature_layers(self) -> list[int]:
        layer = self.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens one tower pass gives: 576 for CLIP ViT-L/14-336 with CLS dropped. A
        LLaVA-1.5 picture becomes that many; a LLaVA-NeXT one more (see `image_tokens`)."""
        n = self.vision_config.num_patches
        return n if self.vision_feature_select_strategy == "default" else n + 1

    def image_tiles(self, image_size: Optional[tuple[int, int]] = None) -> int:
        """Tower passes for a picture of `image_size` (height, width): 1 for LLaVA-1.5; for
        LLaVA-NeXT the base picture plus its grid of tiles."""
        if not self.is_next:
            return 1
        rows, cols = anyres.grid_shape(
            _image_size(image_size), self.image_grid_pinpoints, self.vision_config.image_size
        )
        return 1 + rows * cols

    def image_tokens(self, image_size: Optional[tuple[int, int]] = None) -> int:
        """Image tokens for a picture of `image_size` (height, width): `num_image_tokens` for
        LLaVA-1.5; for LLaVA-NeXT the base picture's, plus its unpadded grid with a newline
        after each row (2928 for a 560x560 picture at 336 px)."""
        if not self.is_next:
            return self.num_image_tokens
        return anyres.num_image_tokens(
            _image_size(image_size),
            self.image_grid_pinpoints,
            self.vision_config.image_size,
            self.vision_config.patch_size,
        )


def _image_size(image_size: Optional[tuple[int, int]]) -> tuple[int, int]:
    if image_size is None:
        raise ValueError("LLaVA-NeXT counts a picture's tokens from its size: pass image_sizes")
    height, width = (int(x) for x in image_size)
    return height, width
