"""Training: the two LLaVA stages (projector alignment, visual instruction tuning) on MLX."""

from .args import TrainArgs
from .data import BadSampleError, Sample, prepare_samples, tokenize_conversation
from .init import init_model_folder
from .trainer import train

__all__ = [
    "BadSampleError",
    "Sample",
    "TrainArgs",
    "init_model_folder",
    "prepare_samples",
    "tokenize_conversation",
    "train",
]
