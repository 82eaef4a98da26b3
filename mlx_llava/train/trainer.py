"""The training loop: the model set up for its stage, the data, the optimizer, the steps,
validation, logging and checkpoints; data-parallel over the ranks of `mlx.launch`.

Stage 1 ("pretrain", feature alignment): the vision tower and the language model are frozen, the
projector learns from image-caption pairs in the `plain` template. Stage 2 ("finetune", visual
instruction tuning): the projector and the language model (fully, or LoRA adapters fused at the
end) learn from conversations in a template that ends answers with `</s>` (`vicuna_v1`); the
vision tower too with `train_vision`. The loss is the mean cross-entropy over answer tokens.

Under `mlx.launch -n N` every rank holds the whole model and takes a contiguous part of each
global micro-batch (`--batch-size` stays the global batch); the gradients are weighted by each
part's answer tokens and summed across the ranks, so N ranks compute the step of one process.
Every rank keeps the same weights and optimizer state; rank 0 alone writes the log, the
checkpoints and the model. One process is the case N = 1 of the same code.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .. import distributed
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


def evaluate(
    model: Model,
    samples: list[Sample],
    processor: Processor,
    args: TrainArgs,
    policy,
    group: Optional[mx.distributed.Group] = None,
) -> float:
    """Token-weighted mean loss over the validation samples (at most `val_batches` batches),
    each batch split across the ranks of `group`."""
    total, count = mx.array(0.0), mx.array(0.0)
    for i, samples_i in enumerate(iterate_eval_batches(samples, args.batch_size)):
        if args.val_batches and i >= args.val_batches:
            break
        batch = make_batch(distributed.shard(samples_i, group), processor, policy)
        if batch is None:
            continue
        loss, ntoks = loss_fn(model, *batch.loss_inputs)
        total, count = total + loss * ntoks, count + ntoks
        mx.eval(total, count)
    total, count = distributed.sum_values([total.item(), count.item()], group)
    return total / max(count, 1)


def _load_samples(
    path, *, image_folder, video_folder, frames, processor, template, max_length, policy, what
):
    records = read_records(path)
    folder = Path(image_folder) if image_folder else Path(path).parent
    videos = Path(video_folder) if video_folder else folder
    samples = prepare_samples(
        records, processor, template, folder, max_length, policy, videos, frames
    )
    skipped = len(records) - len(samples)
    log(f"{what}: {len(samples)} samples" + (f" ({skipped} skipped)" if skipped else ""))
    if not samples:
        raise ValueError(f"no usable samples in {path}")
    return samples


def _rank_warn(message: str) -> None:
    print(distributed.rank_prefix() + message, file=sys.stderr, flush=True)


class Trainer:
    """One training run: the model set up for its stage, the data, the optimizer and the loop."""

    def __init__(self, args: TrainArgs):
        self.args = args
        self.group = distributed.world()
        self.ranks = self.group.size()
        self.main = distributed.is_main(self.group)  # rank 0 owns the output folder
        self.out = Path(args.output)
        self.checkpoint_dir = self.out / CHECKPOINT_DIR
        if self.main:
            self._check_output()
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
        # This rank's sums since the last log entry (the run's: their sum over the ranks).
        self.pending = {"loss": 0.0, "tokens": 0, "trained": 0.0}
        if args.resume:
            self._resume()
        else:
            self.optimizer.init(self.model.trainable_parameters())
        self.step, self.update = self._make_step()

    def _check_output(self) -> None:
        recover_dir(self.checkpoint_dir)  # a run killed while saving its checkpoint
        if self.args.resume and not (self.checkpoint_dir / "state.json").exists():
            raise FileNotFoundError(f"nothing to resume: {self.checkpoint_dir} has no checkpoint")
        if not self.args.resume and self.checkpoint_dir.exists():
            raise FileExistsError(
                f"{self.out} already holds a training checkpoint: pass --resume to continue it, "
                "or choose another --output"
            )

    def _resume(self) -> None:
        """Rank 0 reads the checkpoint and hands every rank its weights, optimizer state and
        iteration (so the other machines need no copy of the output folder)."""
        state = None
        if self.main:
            state = load_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.args)
            if state["total"] != self.total:
                raise ValueError(
                    f"cannot resume: the checkpoint's run has {state['total']} iterations, "
                    f"this one {self.total}"
                )
        state = distributed.broadcast(state, self.group)
        self.optimizer.init(self.model.trainable_parameters())
        weights = distributed.broadcast_arrays(
            dict(tree_flatten(self.model.trainable_parameters())), self.group
        )
        self.model.load_weights(list(weights.items()), strict=False)
        optimizer_state = distributed.broadcast_arrays(
            dict(tree_flatten(self.optimizer.state)), self.group
        )
        self.optimizer.state = tree_unflatten(list(optimizer_state.items()))
        self.start = state["iteration"]
        if self.main:  # the run's sums so far; the other ranks add theirs from here on
            self.pending = state["pending"]

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
        """Every rank reads and checks all the records (each reports nothing but rank 0); a
        picture that fails to decode later is reported by the rank whose batch holds it."""
        args = self.args
        max_length = args.max_length or self.config.text_config.max_position_embeddings
        self.prepare_policy = BadSamplePolicy(args.on_bad_sample, warn=log)
        load = partial(
            _load_samples,
            image_folder=args.image_folder,
            video_folder=args.video_folder,
            frames=args.frames,
            processor=self.processor,
            template=self.template,
            max_length=max_length,
            policy=self.prepare_policy,
        )
        self.samples = load(args.data, what="train")
        self.val_samples = load(args.val_data, what="val") if args.val_data else []
        digest = hashlib.sha1()
        for sample in self.samples + self.val_samples:
            digest.update(f"{sample.id}:{len(sample)}:{sample.image}:{sample.video};".encode())
        distributed.check_same(digest.hexdigest()[:16], "training data", self.group)
        self.policy = BadSamplePolicy(args.on_bad_sample, warn=_rank_warn)
        per_epoch = batches_per_epoch(len(self.samples), args.batch_size)
        epochs = args.epochs or 1.0
        self.total = args.iters or max(1, math.ceil(epochs * per_epoch / args.grad_accum))

    def _make_step(self) -> tuple[Callable, Callable]:
        """The micro-batch step (this rank's loss and weighted gradients, accumulated) and the
        update (the gradients summed over the ranks, then the optimizer step)."""
        model, optimizer, group, args = self.model, self.optimizer, self.group, self.args
        loss_and_grad = nn.value_and_grad(model, loss_fn)

        def step(inputs, targets, mask, pixel_values, image_sizes, videos, weight, prev_grad):
            (loss, ntoks), grad = loss_and_grad(
                model, inputs, targets, mask, pixel_values, image_sizes, videos
            )
            grad = tree_map(lambda g: g * weight, grad)
            if prev_grad is not None:
                grad = tree_map(lambda a, b: a + b, grad, prev_grad)
            return loss, ntoks, grad

        def update(grad):
            grad = average_gradients(grad, group)  # the weights already hold the factor N
            if args.grad_accum > 1:
                grad = tree_map(lambda g: g / args.grad_accum, grad)
            if args.max_grad_norm > 0:
                grad, _ = optim.clip_grad_norm(grad, args.max_grad_norm)
            optimizer.update(model, grad)

        if args.compile:
            state = [model.state, optimizer.state, mx.random.state]
            step = mx.compile(step, inputs=state, outputs=state)
            update = mx.compile(update, inputs=state, outputs=state)
        return step, update

    def _iteration(self, it: int) -> None:
        """One optimizer step over `grad_accum` global micro-batches.

        A micro-batch's loss is the mean over the answer tokens of the whole global batch: the
        rank holding n_r of its n answer tokens weights the gradient of its own mean by
        n_r / n (times N, which `average_gradients` divides out), so that the sum over the
        ranks is the gradient one process computes, whatever the padding or the split.
        """
        args, K = self.args, self.args.grad_accum
        grad, trained = None, False
        for j in range(K):
            k = (it - 1) * K + j
            mx.random.seed(args.seed * 2**32 + k)
            indices = batch_indices(len(self.samples), args.batch_size, args.seed, k)
            mine = distributed.shard(indices, self.group)
            batch = make_batch([self.samples[i] for i in mine], self.processor, self.policy)
            local = 0 if batch is None else batch.answer_tokens
            (total,) = distributed.sum_values([local], self.group)
            trained = trained or total > 0
            if local == 0:
                continue
            weight = mx.array(self.ranks * local / total, dtype=mx.float32)
            loss, ntoks, grad = self.step(*batch.loss_inputs, weight, grad)
            mx.eval(loss, ntoks, grad)
            self.pending["loss"] += loss.item() * local
            self.pending["trained"] += local
            self.pending["tokens"] += batch.tokens
        if trained:  # a rank whose parts were all empty adds nothing to the sum
            if grad is None:
                grad = tree_map(mx.zeros_like, self.model.trainable_parameters())
            self.update(grad)
            mx.eval(self.model.state, self.optimizer.state)

    def _run_sums(self) -> dict:
        """`pending` summed over the ranks: the whole run's figures since the last log entry."""
        keys = ("loss", "tokens", "trained")
        values = distributed.sum_values([self.pending[k] for k in keys], self.group)
        return dict(zip(keys, values))

    def _checkpoint_state(self, iteration: int) -> dict:
        return {
            "iteration": iteration,
            "total": self.total,
            "pending": self._run_sums(),
            "ranks": self.ranks,
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
        train_log = None
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            train_log = TrainLog(self.out / LOG_FILE, self.start)
        ranks = self.ranks
        run_start = tic = time.perf_counter()
        val_time = 0.0
        for it in range(self.start + 1, total + 1):
            self._iteration(it)
            if it % args.log_every == 0 or it == total:
                sums = self._run_sums()
                elapsed = time.perf_counter() - tic - val_time
                lr = self.optimizer.learning_rate.item()
                loss = sums["loss"] / max(sums["trained"], 1)
                tps = sums["tokens"] / max(elapsed, 1e-9)
                if train_log is not None:
                    train_log.write(
                        {
                            "iter": it,
                            "loss": loss,
                            "lr": lr,
                            "tokens_per_sec": round(tps, 1),
                            "ranks": ranks,
                        }
                    )
                eta = (time.perf_counter() - run_start) / (it - self.start) * (total - it)
                log(
                    f"iter {it}/{total} | loss {loss:.4f} | lr {lr:.2e} | "
                    f"{tps:.0f} tok/s | ranks {ranks} | ETA {format_duration(eta)}"
                )
                self.pending = {"loss": 0.0, "tokens": 0, "trained": 0.0}
                tic, val_time = time.perf_counter(), 0.0
            if self.val_samples and (it % args.val_every == 0 or it == total):
                vtic = time.perf_counter()
                val_loss = evaluate(
                    self.model, self.val_samples, self.processor, args, self.policy, self.group
                )
                if train_log is not None:
                    train_log.write({"iter": it, "val_loss": val_loss, "ranks": ranks})
                log(f"iter {it}/{total} | val loss {val_loss:.4f}")
                val_time += time.perf_counter() - vtic
            if (args.save_every and it % args.save_every == 0) or it == total:
                state = self._checkpoint_state(it)
                if self.main:
                    save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, state)
                distributed.barrier(self.group)

        if args.lora:
            fuse_lora(self.model)
        if self.main:
            save_model(self.out, self.model, self.config, self.processor_folders, self.save_dtype)
        distributed.barrier(self.group)
        (late,) = distributed.sum_values([self.policy.skipped], self.group)
        skipped = self.prepare_policy.skipped + int(late)
        if skipped:
            log(f"{skipped} bad samples were skipped")
        log(f"saved the model to {self.out} ({format_duration(time.perf_counter() - run_start)})")
        return self.out


def train(args: TrainArgs) -> Path:
    """Run a training stage; the output folder is a complete MLX model folder.

    Returns:
        The output folder (`args.output`), which also holds `train_log.jsonl` and
        `checkpoint/` (trainable weights, optimizer state, iteration) for `--resume`.
    """
    return Trainer(args).run()
