"""LLaVA on MLX: image -> CLIP ViT -> projector -> image tokens in the prompt -> Llama answers."""

from .batch import BatchResult, batch_generate
from .chat import ChatSession
from .config import ModelConfig, TextConfig, VisionConfig
from .convert import QuantizeSpec, convert
from .generate import GenerationResponse, generate, stream_generate
from .loader import load, load_model
from .model import Model
from .processor import Processor
from .prompt import PromptCache
from .sampling import SamplingParams
from .video_io import read_video

__version__ = "0.1.0"

__all__ = [
    "BatchResult",
    "ChatSession",
    "GenerationResponse",
    "Model",
    "ModelConfig",
    "Processor",
    "PromptCache",
    "QuantizeSpec",
    "SamplingParams",
    "TextConfig",
    "VisionConfig",
    "batch_generate",
    "convert",
    "generate",
    "load",
    "load_model",
    "read_video",
    "stream_generate",
]
