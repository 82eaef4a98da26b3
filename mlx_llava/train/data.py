"""Training data: LLaVA JSON records -> token ids with an answer mask -> padded batches.

Records are LLaVA-Instruct-150K / LLaVA-558K entries: `{"id", "image", "conversations": [{"from":
"human" | "gpt", "value"}, ...]}`, or LLaVA-Video-178K's with a `video` file instead of `image`
(models that see videos); an entry with neither is a text-only sample. As the original
`preprocess_multimodal` does, `<image>` (`<video>`) is moved to the front of its turn
(`"<image>\\n" + text`); in a video entry `<image>` stands for the video, as LLaVA-NeXT's
train.py reads LLaVA-Video-178K.
The conversation is rendered with a template (`plain` for stage 1, `vicuna_v1` for stage 2) and
only the assistant answers and their end-of-turn text (`answer_mask_spans`) are trained on.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from .. import datafiles
from ..conversation import IMAGE_TOKEN, SeparatorStyle, Template, answer_mask_spans, render
from ..datafiles import DataFileError, relative_picture
from ..processor import VIDEO_PLACEHOLDER, Processor
from ..video_io import DEFAULT_NUM_FRAMES, VideoLoadError, count_video_frames, read_video

MAX_WARNINGS = 20  # bad-sample warnings printed before a summary takes over
PAD_MULTIPLE = 8  # batch lengths are rounded up to this, so that compiled steps are reused
EXIF_ORIENTATION = 0x0112


class BadSampleError(ValueError):
    """A training record that cannot be used; the message names the entry."""


@dataclass
class Sample:
    """One tokenized record.

    Attributes:
        id: the entry's `id` (or `#index` when it has none).
        ids: token ids [L], each image expanded to its image tokens.
        mask: [L] bool, True at the tokens trained on (answers and their end of turn).
        image: the picture's path, or None for a text-only sample.
        image_size: the picture's upright (height, width), which sets its token count for
            LLaVA-NeXT.
        video: the video's path, or None.
        video_frames: the frames read from the video (`--frames`, fewer for a shorter clip),
            which set its token count.
    """

    id: str
    ids: np.ndarray
    mask: np.ndarray
    image: Optional[Path]
    image_size: Optional[tuple[int, int]] = None
    video: Optional[Path] = None
    video_frames: int = 0

    def __len__(self) -> int:
        return len(self.ids)


class BadSamplePolicy:
    """What to do with a bad record: "skip" warns on stderr and goes on, "stop" raises."""

    def __init__(self, mode: str = "skip", warn: Callable[[str], None] = None):
        if mode not in ("skip", "stop"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'stop', got '{mode}'")
        self.mode = mode
        self.skipped = 0
        self._warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))

    def __call__(self, error: BadSampleError) -> None:
        if self.mode == "stop":
            raise error
        self.skipped += 1
        if self.skipped <= MAX_WARNINGS:
            self._warn(f"warning: skipping {error}")
        elif self.skipped == MAX_WARNINGS + 1:
            self._warn("warning: more bad samples skipped; only the count is reported now")


def read_records(path: str | Path) -> list:
    """The list of records in a LLaVA JSON (or JSON Lines) file."""
    records = datafiles.read_records(path)
    if not isinstance(records, list):
        raise DataFileError(f"{path} must hold a JSON list of records")
    return records


def _entry_name(record, index: int) -> str:
    if isinstance(record, dict) and record.get("id") is not None:
        return f"entry '{record['id']}'"
    return f"entry #{index}"


def normalise_messages(record: dict, name: str, plain: bool) -> list[tuple[str, str]]:
    """The record's turns as ("user" | "assistant", text), `<image>` (`<video>`) at the front
    of its turn; in a record with a `video`, `<image>` placeholders become `<video>`.

    Raises:
        BadSampleError: malformed turns, no answer, or placeholders that do not match the
            record's picture or video.
    """
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSampleError(f"{name}: malformed conversation ('conversations' must be a list)")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSampleError(f"{name}: malformed conversation (each turn needs a 'value')")
        role = roles.get(turn.get("from"))
        if role is None:
            raise BadSampleError(
                f"{name}: malformed conversation (unknown role {turn.get('from')!r})"
            )
        messages.append([role, turn["value"]])
    if messages[0][0] == "assistant":  # the original drops a leading answer
        messages = messages[1:]
    if not messages:
        raise BadSampleError(f"{name}: no answer turn")
    for i, (role, text) in enumerate(messages):
        if role != ("user", "assistant")[i % 2]:
            raise BadSampleError(f"{name}: malformed conversation (turns must alternate)")
        if not text.strip():
            raise BadSampleError(f"{name}: malformed conversation (empty turn {i})")
    if not any(role == "assistant" for role, _ in messages):
        raise BadSampleError(f"{name}: no answer turn")

    has_image = record.get("image") is not None
    has_video = record.get("video") is not None
    if has_image and has_video:
        raise BadSampleError(f"{name}: an entry has one picture or one video, not both")
    if has_video:  # LLaVA-Video-178K marks the video with <image> in some records
        for message in messages:
            if message[0] == "user":
                message[1] = message[1].replace(IMAGE_TOKEN, VIDEO_PLACEHOLDER)
    for token, kind, has in (
        (IMAGE_TOKEN, "image", has_image),
        (VIDEO_PLACEHOLDER, "video", has_video),
    ):
        placeholders = sum(text.count(token) for _, text in messages)
        if not has and placeholders:
            raise BadSampleError(f"{name}: the conversation has {token} but the entry no {kind}")
        if has and placeholders > 1:
            raise BadSampleError(f"{name}: {placeholders} {token} placeholders for one {kind}")
        if any(token in text for role, text in messages if role == "assistant"):
            raise BadSampleError(f"{name}: {token} in an answer")
        if has and placeholders == 0:
            messages[0][1] = token + messages[0][1]
        for message in messages:  # as the original preprocess_multimodal
            if token in message[1]:
                text = message[1].replace(token, "").strip()
                message[1] = (token + "\n" + text).strip()
    if plain:
        if not has_image:
            raise BadSampleError(f"{name}: stage-1 (plain) samples need an image")
        if len(messages) != 2:
            raise BadSampleError(
                f"{name}: stage-1 (plain) samples are one (image, caption) pair, "
                f"got {len(messages)} turns"
            )
    return [(role, text) for role, text in messages]


def tokenize_conversation(
    processor: Processor,
    template: Template,
    messages: Sequence[tuple[str, str]],
    image_sizes: Optional[Sequence[tuple[int, int]]] = None,
    video_frames: Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [L] of the rendered conversation and the answer mask [L].

    A token is trained on when it starts inside an `answer_mask_spans` span widened to the
    spaces before it: generation prompts end at `ASSISTANT:`, so the model has to produce the
    space too, be it a piece of its own ("▁") or the start of the answer's ("▁red"), as the
    original's `instruction_len - 2` arithmetic trains it. Each image token is expanded to its
    picture's token count (LLaVA-NeXT: from `image_sizes`, (height, width) per picture), and
    each video token to its video's (`config.video_tokens` of its `video_frames`), never
    trained on.
    """
    text = render(template, messages, add_generation_prompt=False)
    spans = []
    for a, b in answer_mask_spans(template, messages):
        while a > 0 and text[a - 1] == " ":
            a -= 1
        spans.append((a, b))
    ids, offsets = processor.encode_with_offsets(text)
    config = processor.config
    image_id = config.image_token_index
    counts = {image_id: iter(processor.image_token_counts(ids.count(image_id), image_sizes))}
    if config.has_video:
        if ids.count(config.video_token_index) != len(video_frames):
            raise ValueError(
                f"{ids.count(config.video_token_index)} {VIDEO_PLACEHOLDER} placeholder(s) for "
                f"{len(video_frames)} video(s)"
            )
        counts[config.video_token_index] = iter(config.video_tokens(f) for f in video_frames)
    elif video_frames:
        raise ValueError(f"{config.model_type} does not see videos")
    out_ids, out_mask = [], []
    for token, (start, end) in zip(ids, offsets):
        if token in counts:
            n = next(counts[token])
            out_ids += [token] * n
            out_mask += [False] * n
            continue
        out_ids.append(token)
        out_mask.append(end > start and any(a <= start < b for a, b in spans))
    return np.array(out_ids, dtype=np.int32), np.array(out_mask, dtype=bool)


def _check_image(path: Path, name: str) -> tuple[int, int]:
    """The picture's upright (height, width), from its header (EXIF orientation applied)."""
    if not path.is_file():
        raise BadSampleError(f"{name}: image file not found: {path}")
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # turned by 90 degrees
                width, height = height, width
    except Exception as e:  # noqa: BLE001 - PIL raises many types
        raise BadSampleError(f"{name}: cannot read image {path} ({type(e).__name__})") from None
    return height, width


def _check_video(path: Path, name: str, num_frames: int) -> int:
    """The frames `read_video` will give (from the file's header): the video's token count."""
    try:
        return count_video_frames(path, num_frames)
    except VideoLoadError as e:
        raise BadSampleError(f"{name}: {e}") from None


def _media_path(record: dict, key: str, folder: Path, name: str) -> Optional[Path]:
    """The record's picture or video file (`key`), under `folder`; None when it has none."""
    value = record.get(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadSampleError(f"{name}: '{key}' must be one file name")
    try:
        return folder / relative_picture(value, name)
    except DataFileError as e:
        raise BadSampleError(str(e)) from None


def prepare_samples(
    records: list,
    processor: Processor,
    template: Template,
    image_folder: Path,
    max_length: int,
    policy: BadSamplePolicy,
    video_folder: Optional[Path] = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> list[Sample]:
    """Tokenize and check every record; bad ones go to `policy` (skip with a warning, or raise).

    Image and video files are checked to exist and to have a readable header here (a video's
    header gives its frame count: `num_frames`, fewer for a shorter clip); they are decoded
    batch by batch during training. `video` paths are relative to `video_folder` (default:
    `image_folder`).
    """
    plain = template.sep_style is SeparatorStyle.PLAIN
    video_folder = image_folder if video_folder is None else video_folder
    samples = []
    for index, record in enumerate(records):
        name = _entry_name(record, index)
        try:
            if not isinstance(record, dict):
                raise BadSampleError(f"{name}: not a JSON object")
            path = _media_path(record, "image", image_folder, name)
            video = _media_path(record, "video", video_folder, name)
            if video is not None and not processor.config.has_video:
                raise BadSampleError(
                    f"{name}: has a video, but {processor.config.model_type} does not see videos"
                )
            messages = normalise_messages(record, name, plain)
            size = None if path is None else _check_image(path, name)
            frames = 0 if video is None else _check_video(video, name, num_frames)
            sizes = None if size is None else [size]
            ids, mask = tokenize_conversation(
                processor, template, messages, sizes, [frames] if frames else ()
            )
            if len(ids) > max_length:
                raise BadSampleError(
                    f"{name}: too long ({len(ids)} tokens, image tokens included; "
                    f"--max-length is {max_length})"
                )
            if not mask[1:].any():
                raise BadSampleError(f"{name}: no answer tokens to train on")
            record_id = str(record["id"]) if record.get("id") is not None else f"#{index}"
            samples.append(Sample(record_id, ids, mask, path, size, video, frames))
        except BadSampleError as e:
            policy(e)
    return samples


@dataclass
class Batch:
    """Model inputs for one step; right-padded, so causal attention never sees the padding.

    Attributes:
        inputs: token ids [B, L-1].
        targets: next-token ids [B, L-1] (0 where not trained on).
        mask: [B, L-1] float32, 1 where the target is an answer token.
        pixel_values: [n_images, H, W, 3] in sample order (LLaVA-NeXT: each picture's tiles),
            or None.
        videos: the videos' frames in sample order, as runs of equal frame count:
            [[V, F, H, W, 3], ...], or None.
        tokens: real (non-padding) input tokens, for the tokens/s figure.
        answer_tokens: the targets trained on (`mask.sum()`), counted on the host.
        image_sizes: LLaVA-NeXT: (height, width) of each picture; else None.
    """

    inputs: mx.array
    targets: mx.array
    mask: mx.array
    pixel_values: Optional[mx.array]
    tokens: int
    answer_tokens: int
    image_sizes: Optional[list[tuple[int, int]]] = None
    videos: Optional[list[mx.array]] = None

    @property
    def loss_inputs(self) -> tuple:
        """(inputs, targets, mask, pixel_values, image_sizes, videos): `loss_fn`'s arguments
        after the model, in its order."""
        return (
            self.inputs,
            self.targets,
            self.mask,
            self.pixel_values,
            self.image_sizes,
            self.videos,
        )


def _video_runs(videos: list[np.ndarray]) -> Optional[list[mx.array]]:
    """Videos [F, H, W, 3] in order -> runs of equal frame count, each stacked [V, F, H, W, 3]."""
    runs: list[list[np.ndarray]] = []
    for video in videos:
        if runs and runs[-1][0].shape == video.shape:
            runs[-1].append(video)
        else:
            runs.append([video])
    return [mx.array(np.stack(run)) for run in runs] or None


def make_batch(
    samples: Sequence[Sample], processor: Processor, policy: BadSamplePolicy
) -> Optional[Batch]:
    """Decode the pictures and videos and pad; one that fails to decode is a bad sample."""
    kept, pixels, sizes, videos = [], [], [], []
    for sample in samples:
        if sample.video is not None:
            try:
                # `video_frames` frames of a longer clip are the `--frames` that counted them.
                frames = read_video(sample.video, sample.video_frames)
                frames = processor.image_processor.preprocess_frames(frames)
            except Exception as e:  # noqa: BLE001 - any decoding failure is the entry's fault
                policy(BadSampleError(f"entry '{sample.id}': {e}"))
                continue
            if len(frames) != sample.video_frames:  # the tokens were counted for them
                policy(
                    BadSampleError(
                        f"entry '{sample.id}': {sample.video} gave {len(frames)} frames, its "
                        f"header {sample.video_frames}"
                    )
                )
                continue
            videos.append(frames)
        if sample.image is not None:
            try:
                tiles, size = processor.image_processor.preprocess(sample.image)
            except Exception as e:  # noqa: BLE001 - any decoding failure is the entry's fault
                policy(BadSampleError(f"entry '{sample.id}': cannot decode image ({e})"))
                continue
            if size is not None:
                if tuple(size[0]) != sample.image_size:  # the tokens were counted for it
                    policy(BadSampleError(f"entry '{sample.id}': the picture changed size"))
                    continue
                sizes += size
            pixels.append(tiles)
        kept.append(sample)
    if not kept:
        return None
    # L - 1 inputs (and targets), rounded up to a multiple of PAD_MULTIPLE.
    length = -(-(max(len(s) for s in kept) - 1) // PAD_MULTIPLE) * PAD_MULTIPLE + 1
    ids = np.full((len(kept), length), processor.pad_token_id, dtype=np.int32)
    mask = np.zeros((len(kept), length), dtype=bool)
    for row, sample in enumerate(kept):
        ids[row, : len(sample)] = sample.ids
        mask[row, : len(sample)] = sample.mask
    targets = np.where(mask[:, 1:], ids[:, 1:], 0)
    return Batch(
        inputs=mx.array(ids[:, :-1]),
        targets=mx.array(targets),
        mask=mx.array(mask[:, 1:].astype(np.float32)),
        pixel_values=mx.array(np.concatenate(pixels)) if pixels else None,
        tokens=int(sum(len(s) - 1 for s in kept)),
        answer_tokens=int(mask[:, 1:].sum()),
        image_sizes=sizes if processor.config.is_next else None,
        videos=_video_runs(videos),
    )


def batches_per_epoch(num_samples: int, batch_size: int) -> int:
    """Full batches in one epoch (the last partial one is dropped; at least one batch)."""
    return max(1, num_samples // batch_size)


def batch_indices(num_samples: int, batch_size: int, seed: int, k: int) -> np.ndarray:
    """The sample indices of micro-batch `k` of the run: epoch `e` visits the samples in a
    permutation seeded by (seed, e), so any point of the run can be recomputed on resume.
    """
    per_epoch = batches_per_epoch(num_samples, batch_size)
    epoch, j = divmod(k, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    return order[j * batch_size : (j + 1) * batch_size]


def iterate_eval_batches(samples: Sequence[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """Consecutive batches over all samples, in order (validation)."""
    for i in range(0, len(samples), batch_size):
        yield list(samples[i : i + batch_size])
