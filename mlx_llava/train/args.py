"""The settings of a training run: `TrainArgs`, whose fields are train.py's flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..convert import DTYPES
from ..video_io import DEFAULT_NUM_FRAMES

STAGES = ("pretrain", "finetune")
DEFAULT_LEARNING_RATE = {"pretrain": 1e-3, "finetune": 2e-5, "lora": 2e-4}
DEFAULT_CONV_MODE = "vicuna_v1"
ONEVISION_CONV_MODE = "chatml"  # Qwen2's turns; answers end with <|im_end|>
CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "train_log.jsonl"
# Settings a resumed run must share with the checkpoint, or it would not continue the same run.
RESUME_KEYS = (
    "stage",
    "batch_size",
    "grad_accum",
    "learning_rate",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "lora",
    "lora_rank",
    "lora_scale",
    "train_vision",
    "conv_mode",
    "frames",
)


@dataclass
class TrainArgs:
    """Everything `train` needs; the CLI flags of train.py map onto these fields."""

    model: str
    data: str
    output: str
    stage: str = "finetune"
    image_folder: Optional[str] = None
    video_folder: Optional[str] = None
    frames: int = DEFAULT_NUM_FRAMES
    iters: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 8
    learning_rate: Optional[float] = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.03
    lora: bool = False
    lora_rank: int = 8
    lora_scale: float = 2.0
    train_vision: bool = False
    grad_accum: int = 1
    grad_checkpoint: bool = False
    save_every: int = 0
    resume: bool = False
    val_data: Optional[str] = None
    val_every: int = 200
    val_batches: int = 0
    log_every: int = 10
    seed: int = 0
    max_length: Optional[int] = None
    on_bad_sample: str = "skip"
    conv_mode: Optional[str] = None
    dtype: Optional[str] = None
    compile: bool = True

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {', '.join(STAGES)}, got '{self.stage}'")
        if self.iters is not None and self.epochs is not None:
            raise ValueError("give --iters or --epochs, not both")
        for name in ("batch_size", "grad_accum", "log_every", "val_every", "lora_rank", "frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.save_every < 0 or self.val_batches < 0:
            raise ValueError("--save-every and --val-batches must not be negative")
        if self.iters is not None and self.iters < 1:
            raise ValueError("--iters must be at least 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError("--epochs must be positive")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("--warmup-ratio must be in [0, 1)")
        if self.stage == "pretrain" and self.lora:
            raise ValueError("--lora is for the finetune stage (pretraining trains the projector)")
        if self.learning_rate is None:
            key = "lora" if self.lora else self.stage
            self.learning_rate = DEFAULT_LEARNING_RATE[key]
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
