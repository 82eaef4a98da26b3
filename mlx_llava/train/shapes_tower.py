"""Pre-train a vision tower on shapes-world labels: the demo's stand-in for CLIP's pre-training.

LLaVA starts from a CLIP tower that already sees. A tower that has never been trained gives
features that carry colour but little geometry, and LLaVA's two stages on top of it did not learn
shape or left/right (docs/training.md). So before stage 1 the demo's tower learns, from the
features LLaVA uses (the selected layer, CLS dropped), to name what a picture holds:

- from the mean of its patch features: how many shapes, the colour and kind of each from left
  to right, and which half a lone shape is in;
- from each patch feature: which kind of shape, if any, covers that patch.

The probes are then thrown away and the model folder is written again with the new tower; the
projector and language model are untouched. Pictures are drawn on the fly (`mlx_llava.data.shapes`),
so the tower never sees the same one twice.

    python -m mlx_llava.train.shapes_tower --model init --output tower
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from PIL import Image, ImageDraw

from ..atomic import replace_dir, staging_dir
from ..cli import run_cli
from ..cli.args import make_parser
from ..data.shapes import COLORS, KINDS, Shape, draw_scene, draw_shape, picture_size
from ..image_processor import CLIPImageProcessor
from ..loader import build_model, read_model
from ..model import Model
from ..processor import Processor
from .checkpoints import save_model

MAX_SHAPES = 3
# The picture-level labels, in order, with their number of classes; -1 marks "not asked".
LABELS = (
    ("count", MAX_SHAPES),
    *((f"{what}{i}", n) for i in range(MAX_SHAPES) for what, n in (("color", 4), ("kind", 3))),
    ("side", 2),
)
PATCH_CLASSES = 1 + len(KINDS)  # background, then KINDS
PATCH_COVERAGE = 0.25  # a patch is labelled with a kind when the shape covers this much of it


def picture_labels(shapes: list[Shape], width: int) -> list[int]:
    """The `LABELS` of one scene: count, colour and kind left to right, a lone shape's side."""
    ordered = sorted(shapes, key=lambda s: s.cx)
    labels = [len(ordered) - 1]
    for i in range(MAX_SHAPES):
        if i < len(ordered):
            labels += [list(COLORS).index(ordered[i].color), KINDS.index(ordered[i].kind)]
        else:
            labels += [-1, -1]
    lone = len(ordered) == 1
    labels.append((0 if ordered[0].cx < width / 2 else 1) if lone else -1)
    return labels


def patch_labels(shapes: list[Shape], width: int, height: int, side: int, patch: int) -> np.ndarray:
    """[(side / patch) ** 2] kind (1 + index in KINDS) or 0 per patch, in token order.

    The label picture goes through the pad-to-square and resize of the preprocessing (nearest
    neighbour instead of bicubic), so patch i covers what image token i sees.
    """
    label = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(label)
    for shape in shapes:
        draw_shape(draw, shape, fill=1 + KINDS.index(shape.kind))
    square = Image.new("L", (max(width, height),) * 2, 0)
    square.paste(label, ((square.width - width) // 2, (square.height - height) // 2))
    grid = np.asarray(square.resize((side, side), Image.NEAREST))
    cells = side // patch
    grid = grid.reshape(cells, patch, cells, patch).transpose(0, 2, 1, 3).reshape(cells**2, -1)
    counts = np.stack([(grid == k).sum(1) for k in range(PATCH_CLASSES)], axis=1)
    counts[:, 0] = 0
    kinds = counts.argmax(1)
    return np.where(counts.max(1) >= PATCH_COVERAGE * patch * patch, kinds, 0)


@dataclass
class ShapesBatch:
    pixel_values: mx.array  # [n, H, W, 3]
    labels: mx.array  # [n, len(LABELS)]
    patches: mx.array  # [n, tokens]


def make_batch(
    rng: random.Random, image_processor: CLIPImageProcessor, patch: int, n: int, sizes: tuple
) -> ShapesBatch:
    """`n` fresh scenes of `sizes` (min, max) pixels, preprocessed, with their labels."""
    side = image_processor.crop_size["height"]
    pictures, labels, patches = [], [], []
    for _ in range(n):
        width, height = picture_size(rng, *sizes)
        picture, shapes = draw_scene(rng, width, height)
        pictures.append(picture)
        labels.append(picture_labels(shapes, width))
        patches.append(patch_labels(shapes, width, height, side, patch))
    return ShapesBatch(
        mx.array(image_processor(pictures)), mx.array(np.array(labels)), mx.array(np.array(patches))
    )


class ProbedTower(nn.Module):
    """A model's tower with linear probes on its features: picture labels from their mean,
    kinds per patch."""

    def __init__(self, model: Model, dims: int):
        super().__init__()
        self.model = model
        self.picture_norm = nn.LayerNorm(dims)
        self.picture_head = nn.Linear(dims, sum(n for _, n in LABELS))
        self.patch_norm = nn.LayerNorm(dims)
        self.patch_head = nn.Linear(dims, PATCH_CLASSES)

    def __call__(self, pixel_values: mx.array) -> tuple[mx.array, mx.array]:
        """pixel_values [n, H, W, 3] -> picture logits [n, sum of classes], patch logits
        [n, T, C]."""
        features = self.model.vision_features(pixel_values)
        pictures = self.picture_head(self.picture_norm(features.mean(axis=1)))
        return pictures, self.patch_head(self.patch_norm(features))


def split_logits(logits: mx.array) -> list[mx.array]:
    """Picture logits [n, sum of classes] -> one [n, classes] per entry of `LABELS`."""
    ends = np.cumsum([n for _, n in LABELS])
    return mx.split(logits, ends[:-1].tolist(), axis=-1)


def losses(probed: ProbedTower, batch: ShapesBatch) -> tuple[mx.array, list]:
    """Mean cross-entropy of the asked picture labels plus that of the patch kinds."""
    pictures, patches = probed(batch.pixel_values)
    parts = []
    for j, logits in enumerate(split_logits(pictures)):
        target = batch.labels[:, j]
        asked = target >= 0
        ce = nn.losses.cross_entropy(logits, mx.maximum(target, 0))
        parts.append((ce * asked).sum() / mx.maximum(asked.sum(), 1))
    patch_loss = nn.losses.cross_entropy(patches, batch.patches, reduction="mean")
    return sum(parts) / len(parts) + patch_loss, [*parts, patch_loss]


def accuracies(probed: ProbedTower, batch: ShapesBatch) -> dict[str, float]:
    """Accuracy of each picture label where asked, and of the patch kinds on shape patches."""
    pictures, patches = probed(batch.pixel_values)
    result = {}
    for (name, _), logits, target in zip(LABELS, split_logits(pictures), batch.labels.T):
        asked = target >= 0
        result[name] = ((logits.argmax(-1) == target) & asked).sum().item() / asked.sum().item()
    on_shape = batch.patches > 0
    hits = (patches.argmax(-1) == batch.patches) & on_shape
    result["patch"] = hits.sum().item() / on_shape.sum().item()
    return result


@dataclass
class TowerArgs:
    model: str
    output: str
    iters: int = 4000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.05
    seed: int = 7
    min_size: int = 40
    max_size: int = 224
    log_every: int = 100
    val_pictures: int = 512
    compile: bool = True


def pretrain_tower(args: TowerArgs) -> dict[str, float]:
    """Train the tower of `args.model` with the probes; write the model to `args.output`.

    Returns:
        The final validation accuracies (pictures drawn from another seed).
    """
    folder, out = Path(args.model), Path(args.output)
    config, weights, processor_folders = read_model(folder, "float32")
    image_processor = Processor.from_pretrained(processor_folders, config).image_processor
    if not image_processor.pad_to_square:
        raise ValueError("the shapes tower needs a model that pads pictures to a square")
    model = build_model(config, weights)
    side, patch = config.vision_config.image_size, config.vision_config.patch_size
    mx.random.seed(args.seed)
    dims = model.vision_features(mx.zeros((1, side, side, 3))).shape[-1]
    model.freeze()
    model.vision_tower.unfreeze()
    probed = ProbedTower(model, dims)
    warmup = optim.linear_schedule(0.0, args.learning_rate, max(args.warmup, 1))
    decay = optim.cosine_decay(args.learning_rate, max(args.iters - args.warmup, 1))
    schedule = optim.join_schedules([warmup, decay], [args.warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=args.weight_decay)
    loss_and_grad = nn.value_and_grad(probed, losses)

    def train_step(pixel_values, labels, patches):
        (loss, _), grads = loss_and_grad(probed, ShapesBatch(pixel_values, labels, patches))
        optimizer.update(probed, grads)
        return loss

    if args.compile:
        state = [probed.state, optimizer.state]
        train_step = mx.compile(train_step, inputs=state, outputs=state)
    sizes = (args.min_size, args.max_size)
    rng, val_rng = random.Random(args.seed), random.Random(args.seed + 1)
    val = make_batch(val_rng, image_processor, patch, args.val_pictures, sizes)
    start = time.time()
    for step in range(1, args.iters + 1):
        batch = make_batch(rng, image_processor, patch, args.batch_size, sizes)
        loss = train_step(batch.pixel_values, batch.labels, batch.patches)
        mx.eval(loss, probed.parameters(), optimizer.state)
        if step % args.log_every == 0 or step == args.iters:
            scores = accuracies(probed, val)
            shown = " ".join(f"{k} {v:.2f}" for k, v in scores.items())
            elapsed = time.time() - start
            print(
                f"iter {step}/{args.iters} | loss {loss.item():.3f} | val {shown} | {elapsed:.0f}s",
                flush=True,
            )

    staged = staging_dir(out)
    save_model(staged, model, config, processor_folders, mx.float32)
    replace_dir(staged, out)
    return scores


def main(argv: list[str] | None = None) -> None:
    defaults = TowerArgs(model="", output="")
    p = make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="MLX model folder whose tower to train")
    p.add_argument("--output", required=True, help="where to write the model with the new tower")
    ints = ("iters", "batch_size", "warmup", "seed", "min_size", "max_size", "log_every")
    for name in (*ints, "val_pictures"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("learning_rate", "weight_decay"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    p.add_argument("--no-compile", dest="compile", action="store_false")
    args = p.parse_args(argv)

    def command():
        pretrain_tower(TowerArgs(**vars(args)))
        print(f"wrote {args.output}")

    run_cli(command)


if __name__ == "__main__":
    main()
