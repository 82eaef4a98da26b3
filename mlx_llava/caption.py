"""Caption every picture (or video) of a folder into a JSON-lines file, in batches, resumably."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable, Optional, Union

from . import distributed
from .progress import Progress
from .video_io import DEFAULT_NUM_FRAMES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".gif")
DEFAULT_CAPTION_PROMPT = "Describe this image."
DEFAULT_VIDEO_PROMPT = "Describe this video."
DEFAULT_BATCH_SIZE = 8


def list_images(image_dir: Union[str, Path], extensions: tuple = IMAGE_EXTENSIONS) -> list[str]:
    """Picture (or `extensions`) files under `image_dir` (recursively), as sorted relative
    POSIX paths."""
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {image_dir}")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            if name.lower().endswith(extensions) and not name.startswith("."):
                found.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(found)


def done_files(output: Path) -> set[str]:
    """The `file` of each record already in a JSONL output (unparsable lines are ignored)."""
    if not output.exists():
        return set()
    done = set()
    with open(output, encoding="utf-8") as f:
        for line in f:
            try:
                done.add(json.loads(line)["file"])
            except (ValueError, KeyError, TypeError):
                continue
    return done


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _open_for_append(output: Union[str, Path]):
    out = open(output, "a+", encoding="utf-8")
    out.seek(0, os.SEEK_END)
    if out.tell() > 0:  # a record cut short by a crash must not swallow the next one
        out.seek(out.tell() - 1)
        if out.read(1) != "\n":
            out.write("\n")
    return out


def caption_folder(
    model,
    processor,
    image_dir: Union[str, Path],
    output: Optional[Union[str, Path]] = None,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    seed: Optional[int] = None,
    group: Optional[distributed.Group] = None,
    videos: bool = False,
    num_frames: int = DEFAULT_NUM_FRAMES,
    **sampling,
) -> int:
    """Caption the pictures of a folder with `batch_generate`, one JSONL record per picture.

    Each record is `{"file", "prompt", "answer"}` (`file` relative to `image_dir`), written and
    flushed batch by batch; with a `json_schema` or `response_format` the answer is the parsed
    JSON object (or the text, when `max_tokens` cut it short of valid JSON). Files already in
    `output` are skipped, so an interrupted run resumes where it stopped; unreadable files are
    skipped with a warning on stderr (and tried again on the next run).

    Under `mlx.launch` (`group` of N ranks, every machine holding the folder at the same path)
    each round of N x `batch_size` pictures is split across the ranks, a batch each, and rank 0
    alone writes the round's records, in the order of one process: greedy captions are the same
    line for line. A crash of any rank loses at most the round under way.

    Args:
        image_dir: the folder, walked recursively for jpg/jpeg/png/webp/bmp/gif files, sorted.
        output: the JSONL file (appended to), or None / "-" for stdout (no resuming).
        prompt: the question asked about each picture (wrapped in the model's template).
        batch_size: pictures per `batch_generate` call.
        progress: report progress on stderr.
        seed: seed MLX's random generator once, before the first batch.
        group: the ranks to split the pictures across (default: all of `mlx.launch`'s).
        videos: caption the folder's videos (mp4, mov, webm, mkv, gif; OneVision,
            NeXT-Video) instead of its pictures, `num_frames` frames sampled from each.
        **sampling: as for `batch_generate` (max_tokens, temperature, top_p, stop, ...).

    Returns:
        The number of records written.
    """
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    group = group or distributed.world()
    main = distributed.is_main(group)
    root = Path(image_dir)
    files = list_images(root, VIDEO_EXTENSIONS if videos else IMAGE_EXTENSIONS)
    to_stdout = output is None or str(output) == "-"
    todo = None
    if main:  # rank 0 owns the output: it says what is left to do
        done = set() if to_stdout else done_files(Path(output))
        todo = [f for f in files if f not in done]
        already = len(files) - len(todo)
        if progress and already:
            print(
                f"resuming: {already} of {len(files)} pictures already captioned in {output}, "
                f"{len(todo)} to go",
                file=sys.stderr,
            )
    todo = distributed.broadcast(todo, group)
    if seed is not None:
        import mlx.core as mx

        mx.random.seed(seed)
    if videos:
        from .processor import VIDEO_PLACEHOLDER

        template_prompt = processor.format_prompt(VIDEO_PLACEHOLDER + "\n" + prompt, 0)
    else:
        template_prompt = processor.format_prompt(prompt, num_images=1)
    media = (num_frames,) if videos else None
    out = None
    if main:
        out = sys.stdout if to_stdout else _open_for_append(output)
    meter = Progress(len(todo), "captioned", "images", enabled=progress and main)
    structured = any(sampling.get(k) is not None for k in ("json_schema", "response_format"))
    written = skipped = 0
    try:
        for names in _batches(todo, batch_size * group.size()):
            mine = distributed.shard(names, group)
            answered = _caption_batch(
                model, processor, root, mine, template_prompt, sampling, media
            )
            for records, warnings in distributed.gather(answered, group):
                for warning in warnings:
                    skipped += 1
                    if main:
                        meter.message(warning)
                for record in records:
                    answer = _parsed(record[1]) if structured else record[1]
                    record = {"file": record[0], "prompt": prompt, "answer": answer}
                    if out is not None:
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += len(records)
            if out is not None:
                out.flush()
            meter.update(written, f", {skipped} skipped" if skipped else "")
    finally:
        meter.close()
        if out is not None and not to_stdout:
            out.close()
    return written


def _parsed(answer: str):
    """A structured answer as JSON, or as it is when it is not (cut by `max_tokens`)."""
    try:
        return json.loads(answer)
    except ValueError:
        return answer


def _caption_batch(
    model, processor, root: Path, names, prompt: str, sampling: dict, videos: Optional[tuple]
):
    """([file, answer] for each readable picture of `names`, warnings for the others);
    `videos` = (num_frames,): the files are videos."""
    from .batch import batch_generate
    from .image_io import ImageLoadError, load_image
    from .video_io import VideoLoadError, read_video

    kept, media, warnings = [], [], []
    for name in names:
        try:
            media.append(
                load_image(root / name) if videos is None else read_video(root / name, *videos)
            )
            kept.append(name)
        except (ImageLoadError, VideoLoadError) as e:
            warnings.append(f"warning: skipping {name}: {e}")
    if not kept:
        return [], warnings
    if videos is None:
        answers = batch_generate(model, processor, [prompt] * len(kept), images=media, **sampling)
        return [[name, answer.strip()] for name, answer in zip(kept, answers)], warnings
    answers = {}
    for frames in sorted({len(m) for m in media}):  # a batch's videos have one frame count
        mine = [i for i, m in enumerate(media) if len(m) == frames]
        batch = [media[i] for i in mine]
        texts = batch_generate(model, processor, [prompt] * len(mine), videos=batch, **sampling)
        answers.update(zip(mine, texts))
    return [[name, answers[i].strip()] for i, name in enumerate(kept)], warnings
