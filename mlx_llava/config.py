"""Configurations that read llava-hf `config.json` files field for field.

Each dataclass uses the checkpoint's own field names and the reference library's defaults
(transformers' `CLIPVisionConfig`, `SiglipVisionConfig`, `LlamaConfig`, `MistralConfig`,
`Qwen2Config`, `LlavaConfig`, `LlavaNextConfig`, `LlavaOnevisionConfig`, `LlavaNextVideoConfig`),
so that sparse configs such as llava-hf/llava-1.5-7b-hf's (which leaves every Llama size to the
defaults) mean the same thing here.
"""

from __future__ import annotations

import inspect
import math
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


# transformers' SiglipVisionConfig defaults where they differ from LlavaConfig's CLIP.
SIGLIP_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)
VISION_TYPES = ("clip_vision_model", "siglip_vision_model")


@dataclass
class VisionConfig:
    """CLIP or SigLIP ViT vision tower (`vision_config`, told apart by `model_type`); defaults
    are LlavaConfig's CLIP ViT-L/14-336 (a sparse SigLIP config gets SiglipVisionConfig's)."""

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
    vision_use_head: bool = False

    def __post_init__(self):
        if self.model_type not in VISION_TYPES:
            supported = ", ".join(VISION_TYPES)
            raise ConfigError(
                f"vision model type '{self.model_type}' is not supported ({supported})"
            )
        if self.vision_use_head:
            raise ConfigError("SigLIP's attention-pool head (vision_use_head) is not supported")

    @classmethod
    def from_dict(cls, params: dict) -> "VisionConfig":
        if params.get("model_type") == "siglip_vision_model":
            params = {**SIGLIP_DEFAULTS, "vision_use_head": True, **params}
        return cls(**_known_fields(cls, params))

    @property
    def is_clip(self) -> bool:
        """CLIP: a class token and a pre-norm; SigLIP has neither."""
        return self.model_type == "clip_vision_model"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.is_clip)


# transformers' MistralConfig defaults where they differ from LlamaConfig's (Mistral-7B's sizes).
MISTRAL_DEFAULTS = dict(
    intermediate_size=14336,
    num_key_value_heads=8,
    max_position_embeddings=4096 * 32,
    rms_norm_eps=1e-6,
    sliding_window=4096,
)

# transformers' Qwen2Config defaults where they differ from LlamaConfig's; its sliding window is
# off unless `use_sliding_window` (see `TextConfig.from_dict`).
QWEN2_DEFAULTS = dict(
    vocab_size=151936,
    intermediate_size=22016,
    max_position_embeddings=32768,
)
TEXT_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class TextConfig:
    """Llama / Vicuna / Yi, Mistral or Qwen2 decoder (`text_config`), run by mlx-lm's model of
    that `model_type`; defaults are transformers' LlamaConfig (a sparse Mistral or Qwen2
    config gets MistralConfig's or Qwen2Config's, see `from_dict`)."""

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
        if self.model_type not in TEXT_TYPES:
            raise ConfigError(
                f"text model type '{self.model_type}' is not supported ({', '.join(TEXT_TYPES)})"
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
        if params.get("model_type") == "qwen2":
            params = {**QWEN2_DEFAULTS, **params}
            if not params.get("use_sliding_window", False):
                params["sliding_window"] = None
        return cls(**_known_fields(cls, params))

    def to_mlx_lm_args(self) -> dict:
        """The arguments of mlx-lm's `ModelArgs` for this `model_type`."""
        return dict(
            model_type=self.model_type,
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


MODEL_TYPES = ("llava", "llava_next", "llava_onevision", "llava_next_video")
ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "llava_next_video": "LlavaNextVideoForConditionalGeneration",
}

# LlavaOnevisionConfig: its defaults, and its towers' when the config leaves them out.
ONEVISION_DEFAULTS = dict(
    image_token_index=151646,
    video_token_index=151647,
    vision_feature_select_strategy="full",
    vision_feature_layer=-1,
    vision_aspect_ratio="anyres_max_9",
    image_grid_pinpoints=[[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)],
)
ONEVISION_VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=1152,
    intermediate_size=4304,
    patch_size=14,
    image_size=384,
    num_hidden_layers=26,
    num_attention_heads=16,
    vision_use_head=False,
)
# LlavaNextVideoConfig (its CLIP defaults are LlavaConfig's, its decoder a Llama).
NEXT_VIDEO_DEFAULTS = dict(image_token_index=32001, video_token_index=32000)
SUB_DEFAULTS = {
    "llava_onevision": (ONEVISION_VISION, {"model_type": "qwen2"}),
}


@dataclass
class ModelConfig:
    """The whole LLaVA model (`LlavaConfig`; `LlavaNextConfig`, `LlavaOnevisionConfig` or
    `LlavaNextVideoConfig` by `model_type`), plus the fields original checkpoints need.

    `projector_type` is "mlp2x_gelu" (LLaVA-1.5, llava-hf) or "linear" (LLaVA v1's projection
    matrix W). `image_aspect_ratio` ("pad" or "square"; "anyres" for the tiled models, whose
    pictures follow `image_grid_pinpoints`) and `conv_mode` are recorded by the converter so
    that generation preprocesses and templates as the checkpoint was trained.
    `vision_aspect_ratio` ("anyres_max_N", OneVision) caps a picture's tile grid at about N
    tiles of features; `spatial_pool_*` is LLaVA-NeXT-Video's pooling of video frames.
    """

    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    model_type: str = "llava"
    image_token_index: int = 32000
    video_token_index: Optional[int] = None
    projector_hidden_act: str = "gelu"
    projector_type: str = "mlp2x_gelu"
    multimodal_projector_bias: bool = True
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: Union[int, list[int]] = -2
    image_grid_pinpoints: Optional[list[list[int]]] = None
    vision_aspect_ratio: Optional[str] = None
    spatial_pool_mode: Optional[str] = None
    spatial_pool_stride: Optional[int] = None
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
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"not a LLaVA checkpoint (model_type '{self.model_type}')")
        if self.is_next:
            self._check_next()
        elif self.image_aspect_ratio is None:
            self.image_aspect_ratio = "square"
        elif self.image_aspect_ratio not in ("pad", "square"):
            raise ConfigError(
                f"image_aspect_ratio '{self.image_aspect_ratio}' is not supported (pad, square)"
            )
        if self.model_type == "llava_next_video":
            self.spatial_pool_mode = self.spatial_pool_mode or "average"
            self.spatial_pool_stride = self.spatial_pool_stride or 2
            if self.spatial_pool_mode not in ("average", "max", "conv"):
                raise ConfigError(
                    f"spatial_pool_mode '{self.spatial_pool_mode}' is not supported "
                    "(average, max, conv)"
                )
        if self.has_video and self.video_token_index is None:
            raise ConfigError(f"a {self.model_type} config needs video_token_index")
        layers = self.feature_layers
        n = self.vision_config.num_hidden_layers
        if any(not -n - 1 <= i <= n for i in layers):
            raise ConfigError(f"vision_feature_layer {self.vision_feature_layer} out of range")

    def _check_next(self) -> None:
        """LLaVA-NeXT's settings: pinpoints (LlavaNextConfig's default when absent) that are
        whole tiles, the CLS dropped (transformers' packing cannot place it), an MLP projector."""
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = [list(p) for p in anyres.DEFAULT_PINPOINTS]
        if self.model_type == "llava_onevision":
            self.vision_aspect_ratio = self.vision_aspect_ratio or "anyres_max_9"
            _ = self.max_num_patches  # fails early on a vision_aspect_ratio it cannot parse
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
        if self.vision_config.is_clip and self.vision_feature_select_strategy != "default":
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
        model_type = params.get("model_type", "llava")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"not a LLaVA checkpoint (model_type '{model_type}')")
        # transformers >= 4.45 spells them image_token_id, video_token_id.
        for name in ("image_token", "video_token"):
            if f"{name}_index" not in params and f"{name}_id" in params:
                params[f"{name}_index"] = params[f"{name}_id"]
        defaults = {"llava_onevision": ONEVISION_DEFAULTS, "llava_next_video": NEXT_VIDEO_DEFAULTS}
        params = {**defaults.get(model_type, {}), **params}
        vision_default, text_default = SUB_DEFAULTS.get(model_type, ({}, {}))
        text = dict(params.get("text_config") or text_default)
        # Old llava-hf configs keep the padded vocabulary at the top level only.
        if "vocab_size" not in text and "vocab_size" in params:
            text["vocab_size"] = params["vocab_size"]
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in params:
            text["tie_word_embeddings"] = params["tie_word_embeddings"]
        params["text_config"] = TextConfig.from_dict(text)
        params["vision_config"] = VisionConfig.from_dict(
            params.get("vision_config") or vision_default
        )
        return cls(**_known_fields(cls, params))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out = {k: v for k, v in out.items() if v is not None}
        # sliding_window stays even when null: absent, a Mistral config means MistralConfig's 4096.
        out["text_config"] = {
            k: v for k, v in out["text_config"].items() if v is not None or k == "sliding_window"
        }
        out["architectures"] = [ARCHITECTURES[self.model_type]]
        return out

    @property
    def is_next(self) -> bool:
        """LLaVA-NeXT (1.6) and its successors: pictures tiled at any resolution,
        `image_newline` after each row."""
        return self.model_type != "llava"

    @property
    def has_video(self) -> bool:
        """OneVision and LLaVA-NeXT-Video see videos (`video_token_index`)."""
        return self.model_type in ("llava_onevision", "llava_next_video")

    @property
    def max_num_patches(self) -> Optional[int]:
        """N of `vision_aspect_ratio` "anyres_max_N" (OneVision), else None."""
        if self.vision_aspect_ratio is None:
            return None
        digits = self.vision_aspect_ratio.removeprefix("anyres_max_")
        if not digits.isdigit():
            raise ConfigError(
                f"vision_aspect_ratio '{self.vision_aspect_ratio}' is not supported "
                "(anyres_max_N)"
            )
        return int(digits)

    @property
    def feature_layers(self) -> list[int]:
        layer = self.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens one tower pass gives: 576 for CLIP ViT-L/14-336 with CLS dropped, 729
        for SigLIP-384 (no CLS). A LLaVA-1.5 picture becomes that many; a LLaVA-NeXT one more
        (see `image_tokens`)."""
        n = self.vision_config.num_patches
        if self.vision_config.is_clip and self.vision_feature_select_strategy == "full":
            return n + 1
        return n

    def image_tiles(self, image_size: Optional[tuple[int, int]] = None, alone: bool = True) -> int:
        """Tower passes for a picture of `image_size` (height, width): 1 for LLaVA-1.5; for
        LLaVA-NeXT the base picture plus its grid of tiles; for a OneVision picture that is not
        `alone` in its prompt, its base picture only."""
        if not self.is_next or not self.tiles(alone):
            return 1
        rows, cols = anyres.grid_shape(
            _image_size(image_size), self.image_grid_pinpoints, self.vision_config.image_size
        )
        return 1 + rows * cols

    def tiles(self, alone: bool = True) -> bool:
        """Whether a picture is tiled: always for LLaVA-NeXT, for OneVision only when it is the
        only picture of its prompt (several are each seen whole, as transformers'
        `batch_num_images` decides)."""
        return self.is_next and (alone or self.model_type != "llava_onevision")

    def image_tokens(self, image_size: Optional[tuple[int, int]] = None, alone: bool = True) -> int:
        """Image tokens for a picture of `image_size` (height, width): `num_image_tokens` for
        LLaVA-1.5; for LLaVA-NeXT the base picture's, plus its unpadded grid (OneVision:
        downsampled to about `max_num_patches` tiles) with a newline after each row (2928 for
        a 560x560 picture at 336 px); for a OneVision picture not `alone`, its base picture's
        and one newline."""
        if not self.is_next:
            return self.num_image_tokens
        if not self.tiles(alone):
            return self.num_image_tokens + 1
        return anyres.num_image_tokens(
            _image_size(image_size),
            self.image_grid_pinpoints,
            self.vision_config.image_size,
            self.vision_config.patch_size,
            self.max_num_patches,
        )

    def video_tokens(self, frames: int) -> int:
        """Video tokens for `frames` frames: OneVision pools each frame's grid to half its side
        (rounded up) and adds one newline; LLaVA-NeXT-Video pools by `spatial_pool_stride`."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        if self.model_type == "llava_onevision":
            return frames * math.ceil(side / 2) ** 2 + 1
        return frames * (side // self.spatial_pool_stride) ** 2


def _image_size(image_size: Optional[tuple[int, int]]) -> tuple[int, int]:
    if image_size is None:
        raise ValueError("LLaVA-NeXT counts a picture's tokens from its size: pass image_sizes")
    height, width = (int(x) for x in image_size)
    return height, width
