"""LLaVA on MLX: image -> CLIP ViT -> projector -> image tokens in the prompt -> Llama answers."""

from .config import ModelConfig, TextConfig, VisionConfig
from .convert import QuantizeSpec, convert
from .generate import GenerationResponse, generate, stream_generate
from .loader import load, load_model
from .model import Model
from .processor import Processor

__version__ = "0.1.0"

__all__ = [
    "GenerationResponse",
    "Model",
    "ModelConfig",
    "Processor",
    "QuantizeSpec",
    "TextConfig",
    "VisionConfig",
    "convert",
    "generate",
    "load",
    "load_model",
    "stream_generate",
]
