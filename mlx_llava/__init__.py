"""LLaVA on MLX: image -> CLIP ViT -> projector -> image tokens in the prompt -> Llama answers.

The public names are imported on first use, so that light entry points (the shapes-world data
generator, say) do not pay for importing MLX and mlx-lm.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "config",
    "TextConfig": "config",
    "VisionConfig": "config",
    "Model": "model",
    "Processor": "processor",
    "QuantizeSpec": "convert",
    "convert": "convert",
    "load": "loader",
    "load_model": "loader",
    "GenerationResponse": "generate",
    "PromptCache": "generate",
    "generate": "generate",
    "stream_generate": "generate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mlx_llava' has no attribute '{name}'")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__ + ["__version__"]
