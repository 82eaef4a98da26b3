"""The two LLaVA training stages on MLX: what is trained, the step, the loop, checkpoints.

Stage 1 ("pretrain", feature alignment): the vision tower and the language model are frozen, the
projector learns from image-caption pairs in the `plain` template. Stage 2 ("finetune", visual
instruction tuning): the projector and the language model (fully, or LoRA adapters fused at the
end) learn from conversations in a template that ends answers with `</s>` (`vicuna_v1`); the
vision tower too with `train_vision`. The loss is the mean cross-entropy over answer tokens.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..config import ModelConfig
from ..conversation import Template, get_template
from ..convert import DTYPES, MAX_SHARD_BYTES, PROCESSOR_FILES
from ..loader import build_model, read_model, resolve_model
from ..model import Model
from ..processor import Processor
from ..weights import save_shards
from .data import (
    BadSamplePolicy,
    Sample,
    batch_indices,
    batches_per_epoch,
    iterate_eval_batches,
    make_batch,
    prepare_samples,
    read_records,
)

STAGES = ("pretrain", "finetune")
DEFAULT_LEARNING_RATE = {"pretrain": 1e-3, "finetune": 2e-5, "lora": 2e-4}
DEFAULT_CONV_MODE = "vicuna_v1"
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
)


@dataclass
class TrainArgs:
    """Everything `train` needs; the CLI flags of train.py map onto these fields."""

    model: str
    data: str
    output: str
    stage: str = "finetune"
    image_folder: Optional[str] = None
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
        for name in ("batch_size", "grad_accum", "log_every", "val_every", "lora_rank"):
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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# What is trained ---------------------------------------------------------------------------


def conversation_template(args: TrainArgs, config: ModelConfig) -> Template:
    """`plain` for stage 1; for stage 2 `--conv-mode`, else the model's own template unless it
    cannot teach `</s>` (`plain`; llava-hf's Jinja, which ends answers with a space), else
    `vicuna_v1`.
    """
    if args.stage == "pretrain":
        if args.conv_mode not in (None, "plain"):
            raise ValueError("stage 1 (pretrain) trains with the plain template")
        return get_template("plain")
    if args.conv_mode:
        if get_template(args.conv_mode).sep2 == " ":
            log(
                f"warning: {args.conv_mode} ends answers with a space, not </s>: the model will "
                "not learn to stop"
            )
        return get_template(args.conv_mode)
    mode = config.conv_mode
    if mode in (None, "plain", "llava_hf"):
        mode = DEFAULT_CONV_MODE
    return get_template(mode)


def set_trainable(model: Model, args: TrainArgs) -> None:
    """Freeze all, then unfreeze what the stage trains (adding LoRA layers for `--lora`)."""
    model.freeze()
    if args.stage == "finetune":
        if args.lora:
            from mlx_lm.tuner.utils import linear_to_lora_layers

            lm = model.language_model
            config = {"rank": args.lora_rank, "scale": args.lora_scale, "dropout": 0.0}
            linear_to_lora_layers(lm, len(lm.layers), config)
        else:
            model.language_model.unfreeze()
        if args.train_vision:
            model.vision_tower.unfreeze()
    model.multi_modal_projector.unfreeze()


def fuse_lora(model: Model) -> None:
    """Replace LoRA layers by plain linear layers holding W + scale * B A."""
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))


_CHECKPOINTED: dict[type, type] = {}


def checkpoint_layers(layers: list) -> None:
    """Recompute these layers' activations in the backward pass (`mx.checkpoint`).

    Only these instances change: each gets a subclass whose `__call__` is checkpointed, so other
    models of the same class in the process are untouched (unlike mlx-lm's `grad_checkpoint`).
    """
    for layer in layers:
        cls = type(layer)
        if cls in _CHECKPOINTED.values():
            continue
        if cls not in _CHECKPOINTED:
            call = cls.__call__

            def checkpointed(self, *args, _call=call, **kwargs):
                def inner(params, *args, **kwargs):
                    self.update(params)
                    return _call(self, *args, **kwargs)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

            _CHECKPOINTED[cls] = type(
                f"Checkpointed{cls.__name__}", (cls,), {"__call__": checkpointed}
            )
        layer.__class__ = _CHECKPOINTED[cls]


def make_schedule(learning_rate: float, total: int, warmup_ratio: float) -> Callable:
    """Linear warmup over ceil(ratio * total) steps, then cosine decay to 0 at `total`
    (transformers' `get_cosine_schedule_with_warmup`, as LLaVA trains)."""
    warmup = math.ceil(total * warmup_ratio)
    cosine = optim.cosine_decay(learning_rate, max(total - warmup, 1), 0.0)
    if warmup == 0:
        return cosine
    return optim.join_schedules(
        [optim.linear_schedule(0.0, learning_rate, warmup), cosine], [warmup]
    )


def loss_fn(
    model: Model,
    inputs: mx.array,
    targets: mx.array,
    mask: mx.array,
    pixel_values: Optional[mx.array],
) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over the answer tokens of a batch, and their count."""
    embeddings = model.get_input_embeddings(inputs, pixel_values)
    logits = model(inputs, input_embeddings=embeddings).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    return losses.sum() / mx.maximum(ntoks, 1), ntoks


# Checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(folder: Path, model: Model, optimizer, state: dict) -> None:
    """Trainable weights, optimizer state and the loop's state, replaced atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(
        str(tmp / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_checkpoint(folder: Path, model: Model, optimizer, args: TrainArgs) -> dict:
    """Restore what `save_checkpoint` wrote into a model set up the same way; the loop's state."""
    try:
        with open(folder / "state.json") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"nothing to resume: {folder} has no checkpoint") from None
    for key in RESUME_KEYS:
        saved, now = state["args"].get(key), asdict(args).get(key)
        if saved != now:
            flag = "--" + key.replace("_", "-")
            raise ValueError(
                f"cannot resume: the checkpoint was made with {flag} {saved}, not {now}"
            )
    weights = mx.load(str(folder / "trainable.safetensors"))
    expected = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if set(weights) != expected:
        raise ValueError(
            "cannot resume: the checkpoint's trainable weights do not match the model's"
        )
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    return state


# The finished model ----------------------------------------------------------------------------


def save_model(
    out: Path,
    model: Model,
    config: ModelConfig,
    processor_folders: list[Path],
    dtype: mx.Dtype,
) -> None:
    """Write an MLX model folder (weights, config.json, tokenizer and processor files)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    weights = {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in tree_flatten(model.parameters())
    }
    save_shards(out, weights, MAX_SHARD_BYTES)
    for name in PROCESSOR_FILES:
        source = next((f / name for f in processor_folders if (f / name).exists()), None)
        if source is not None:
            shutil.copy(source, out / name)
    with open(out / "config.json", "w") as f:
        json.dump({**config.to_dict(), "mlx_llava": {"format": 1}}, f, indent=2)


# The loop ------------------------------------------------------------------------------------


class TrainLog:
    """`train_log.jsonl`: one JSON line per logged step and per validation."""

    def __init__(self, path: Path, resume_from: int):
        self.path = path
        lines = []
        if resume_from and path.exists():  # drop what the interrupted run logged after its save
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            lines = [line for line in lines if json.loads(line)["iter"] <= resume_from]
        path.write_text("".join(line + "\n" for line in lines))

    def write(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _format_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def evaluate(model: Model, samples: list[Sample], processor: Processor, args: TrainArgs, policy):
    """Token-weighted mean loss over the validation samples (at most `val_batches` batches)."""
    total, count = mx.array(0.0), mx.array(0.0)
    for i, group in enumerate(iterate_eval_batches(samples, args.batch_size)):
        if args.val_batches and i >= args.val_batches:
            break
        batch = make_batch(group, processor, policy)
        if batch is None:
            continue
        loss, ntoks = loss_fn(model, batch.inputs, batch.targets, batch.mask, batch.pixel_values)
        total, count = total + loss * ntoks, count + ntoks
        mx.eval(total, count)
    return (total / mx.maximum(count, 1)).item()


def _load_samples(path, *, image_folder, processor, template, max_length, policy, what):
    records = read_records(path)
    folder = Path(image_folder) if image_folder else Path(path).parent
    samples = prepare_samples(records, processor, template, folder, max_length, policy)
    skipped = len(records) - len(samples)
    log(f"{what}: {len(samples)} samples" + (f" ({skipped} skipped)" if skipped else ""))
    if not samples:
        raise ValueError(f"no usable samples in {path}")
    return samples


class Trainer:
    """One training run: the model set up for its stage, the data, the optimizer and the loop."""

    def __init__(self, args: TrainArgs):
        self.args = args
        self.out = Path(args.output)
        self.checkpoint_dir = self.out / CHECKPOINT_DIR
        if args.resume and not (self.checkpoint_dir / "state.json").exists():
            raise FileNotFoundError(f"nothing to resume: {self.checkpoint_dir} has no checkpoint")
        if not args.resume and self.checkpoint_dir.exists():
            raise FileExistsError(
                f"{self.out} already holds a training checkpoint: pass --resume to continue it, "
                "or choose another --output"
            )
        self._load_model()
        self._load_data()
        set_trainable(self.model, args)
        if args.grad_checkpoint:
            checkpoint_layers(self.model.language_model.layers)
            if args.train_vision:
                checkpoint_layers(self.model.vision_tower.encoder.layers)
        self.model.train()
        self.optimizer = optim.AdamW(
            learning_rate=make_schedule(args.learning_rate, self.total, args.warmup_ratio),
            weight_decay=args.weight_decay,
            bias_correction=True,
        )
        self.start = 0
        self.pending = {"loss": 0.0, "tokens": 0, "trained": 0.0}  # since the last log entry
        if args.resume:
            state = load_checkpoint(self.checkpoint_dir, self.model, self.optimizer, args)
            if state["total"] != self.total:
                raise ValueError(
                    f"cannot resume: the checkpoint's run has {state['total']} iterations, "
                    f"this one {self.total}"
                )
            self.start, self.pending = state["iteration"], state["pending"]
        self.optimizer.init(self.model.trainable_parameters())
        self.step = self._make_step()

    def _load_model(self) -> None:
        folder = resolve_model(self.args.model, "float32")
        if folder.resolve() == self.out.resolve():
            raise ValueError("--output must differ from the model folder")
        config, weights, self.processor_folders = read_model(folder, None)
        if config.quantization:
            raise ValueError("training needs an unquantized model (this one is quantized)")
        floating = [v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)]
        self.save_dtype = DTYPES[self.args.dtype] if self.args.dtype else floating[0]
        weights = {
            k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
        self.model = build_model(config, weights)
        self.config = config
        self.template = conversation_template(self.args, config)
        config.conv_mode = self.template.name  # generation prompts as training did
        self.processor = Processor.from_pretrained(self.processor_folders, config)

    def _load_data(self) -> None:
        args = self.args
        max_length = args.max_length or self.config.text_config.max_position_embeddings
        self.policy = BadSamplePolicy(args.on_bad_sample)
        load = partial(
            _load_samples,
            image_folder=args.image_folder,
            processor=self.processor,
            template=self.template,
            max_length=max_length,
            policy=self.policy,
        )
        self.samples = load(args.data, what="train")
        self.val_samples = load(args.val_data, what="val") if args.val_data else []
        per_epoch = batches_per_epoch(len(self.samples), args.batch_size)
        epochs = args.epochs or 1.0
        self.total = args.iters or max(1, math.ceil(epochs * per_epoch / args.grad_accum))

    def _make_step(self) -> Callable:
        """The micro-batch step: loss and gradients, accumulated; the update on the last one."""
        model, optimizer = self.model, self.optimizer
        loss_and_grad = nn.value_and_grad(model, loss_fn)

        def step(inputs, targets, mask, pixel_values, prev_grad, do_update):
            (loss, ntoks), grad = loss_and_grad(model, inputs, targets, mask, pixel_values)
            if prev_grad is not None:
                grad = tree_map(lambda a, b: a + b, grad, prev_grad)
            if do_update:
                self._apply_update(grad)
                grad = None
            return loss, ntoks, grad

        if self.args.compile:
            state = [model.state, optimizer.state, mx.random.state]
            step = mx.compile(step, inputs=state, outputs=state)
        return step

    def _apply_update(self, grad) -> None:
        K = self.args.grad_accum
        if K > 1:
            grad = tree_map(lambda g: g / K, grad)
        if self.args.max_grad_norm > 0:
            grad, _ = optim.clip_grad_norm(grad, self.args.max_grad_norm)
        self.optimizer.update(self.model, grad)

    def _iteration(self, it: int) -> None:
        """One optimizer step over `grad_accum` micro-batches."""
        args, K = self.args, self.args.grad_accum
        grad = None
        for j in range(K):
            k = (it - 1) * K + j
            mx.random.seed(args.seed * 2**32 + k)
            indices = batch_indices(len(self.samples), args.batch_size, args.seed, k)
            batch = make_batch([self.samples[i] for i in indices], self.processor, self.policy)
            if batch is None:
                continue
            loss, ntoks, grad = self.step(
                batch.inputs, batch.targets, batch.mask, batch.pixel_values, grad, j == K - 1
            )
            mx.eval(loss, ntoks, grad, self.model.state, self.optimizer.state)
            n = ntoks.item()
            self.pending["loss"] += loss.item() * n
            self.pending["trained"] += n
            self.pending["tokens"] += batch.tokens
        if grad is not None:  # the step's last micro-batch was empty: apply what there is
            self._apply_update(grad)
            mx.eval(self.model.state, self.optimizer.state)

    def _checkpoint_state(self, iteration: int) -> dict:
        return {
            "iteration": iteration,
            "total": self.total,
            "pending": self.pending,
            "rng": "mx.random.seed(seed * 2**32 + micro_batch) before each micro-batch",
            "args": asdict(self.args),
        }

    def run(self) -> Path:
        args, total = self.args, self.total
        n_trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        n_total = sum(v.size for _, v in tree_flatten(self.model.parameters()))
        log(
            f"stage {args.stage}: template {self.template.name}, {total} iterations of "
            f"{args.batch_size} x {args.grad_accum} samples, trainable parameters "
            f"{n_trainable / 1e6:.3f}M of {n_total / 1e6:.3f}M"
        )
        if self.start:
            log(f"resuming at iteration {self.start}")
        self.out.mkdir(parents=True, exist_ok=True)
        train_log = TrainLog(self.out / LOG_FILE, self.start)
        run_start = tic = time.perf_counter()
        val_time = 0.0
        for it in range(self.start + 1, total + 1):
            self._iteration(it)
            if it % args.log_every == 0 or it == total:
                pending = self.pending
                elapsed = time.perf_counter() - tic - val_time
                lr = self.optimizer.learning_rate.item()
                loss = pending["loss"] / max(pending["trained"], 1)
                tps = pending["tokens"] / max(elapsed, 1e-9)
                train_log.write(
                    {"iter": it, "loss": loss, "lr": lr, "tokens_per_sec": round(tps, 1)}
                )
                eta = (time.perf_counter() - run_start) / (it - self.start) * (total - it)
                log(
                    f"iter {it}/{total} | loss {loss:.4f} | lr {lr:.2e} | "
                    f"{tps:.0f} tok/s | ETA {_format_time(eta)}"
                )
                self.pending = {"loss": 0.0, "tokens": 0, "trained": 0.0}
                tic, val_time = time.perf_counter(), 0.0
            if self.val_samples and (it % args.val_every == 0 or it == total):
                vtic = time.perf_counter()
                val_loss = evaluate(self.model, self.val_samples, self.processor, args, self.policy)
                train_log.write({"iter": it, "val_loss": val_loss})
                log(f"iter {it}/{total} | val loss {val_loss:.4f}")
                val_time += time.perf_counter() - vtic
            if (args.save_every and it % args.save_every == 0) or it == total:
                save_checkpoint(
                    self.checkpoint_dir, self.model, self.optimizer, self._checkpoint_state(it)
                )

        if args.lora:
            fuse_lora(self.model)
        save_model(self.out, self.model, self.config, self.processor_folders, self.save_dtype)
        if self.policy.skipped:
            log(f"{self.policy.skipped} bad samples were skipped")
        log(f"saved the model to {self.out} ({_format_time(time.perf_counter() - run_start)})")
        return self.out


def train(args: TrainArgs) -> Path:
    """Run a training stage; the output folder is a complete MLX model folder.

    Returns:
        The output folder (`args.output`), which also holds `train_log.jsonl` and
        `checkpoint/` (trainable weights, optimizer state, iteration) for `--resume`.
    """
    return Trainer(args).run()
