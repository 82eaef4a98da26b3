"""The training loop: the model set up for its stage, the data, the optimizer, the steps,
validation, logging and checkpoints.

Stage 1 ("pretrain", feature alignment): the vision tower and the language model are frozen, the
projector learns from image-caption pairs in the `plain` template. Stage 2 ("finetune", visual
instruction tuning): the projector and the language model (fully, or LoRA adapters fused at the
end) learn from conversations in a template that ends answers with `</s>` (`vicuna_v1`); the
vision tower too with `train_vision`. The loss is the mean cross-entropy over answer tokens.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ..atomic import recover_dir
from ..convert import DTYPES
from ..loader import build_model, read_model, resolve_model
from ..model import Model
from ..processor import Processor
from ..progress import format_duration
from .args import TrainArgs
from .checkpoints import load_checkpoint, save_checkpoint, save_model
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
from .stages import (
    checkpoint_layers,
    conversation_template,
    fuse_lora,
    log,
    loss_fn,
    make_schedule,
    set_trainable,
)

CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "train_log.jsonl"


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
        recover_dir(self.checkpoint_dir)  # a run killed while saving its checkpoint
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
                    f"{tps:.0f} tok/s | ETA {format_duration(eta)}"
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
        log(f"saved the model to {self.out} ({format_duration(time.perf_counter() - run_start)})")
        return self.out


def train(args: TrainArgs) -> Path:
    """Run a training stage; the output folder is a complete MLX model folder.

    Returns:
        The output folder (`args.output`), which also holds `train_log.jsonl` and
        `checkpoint/` (trainable weights, optimizer state, iteration) for `--resume`.
    """
    return Trainer(args).run()
