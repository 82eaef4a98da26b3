"""Caption every picture of a folder into a JSON-lines file, in batches, resumably."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable, Optional, Union

from .progress import Progress

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
DEFAULT_CAPTION_PROMPT = "Describe this image."
DEFAULT_BATCH_SIZE = 8


def list_images(image_dir: Union[str, Path]) -> list[str]:
    """Picture files under `image_dir` (recursively), as sorted relative POSIX paths."""
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {image_dir}")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
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
    **sampling,
) -> int:
    """Caption the pictures of a folder with `batch_generate`, one JSONL record per picture.

    Each record is `{"file", "prompt", "answer"}` (`file` relative to `image_dir`), written and
    flushed batch by batch. Files already in `output` are skipped, so an interrupted run
    resumes where it stopped; unreadable files are skipped with a warning on stderr (and tried
    again on the next run).

    Args:
        image_dir: the folder, walked recursively for jpg/jpeg/png/webp/bmp/gif files, sorted.
        output: the JSONL file (appended to), or None / "-" for stdout (no resuming).
        prompt: the question asked about each picture (wrapped in the model's template).
        batch_size: pictures per `batch_generate` call.
        progress: report progress on stderr.
        seed: seed MLX's random generator once, before the first batch.
        **sampling: as for `batch_generate` (max_tokens, temperature, top_p, stop, ...).

    Returns:
        The number of records written.
    """
    from .batch import batch_generate
    from .image_processor import ImageLoadError, load_image

    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    root = Path(image_dir)
    files = list_images(root)
    to_stdout = output is None or str(output) == "-"
    done = set() if to_stdout else done_files(Path(output))
    todo = [f for f in files if f not in done]
    already = len(files) - len(todo)
    if progress and already:
        print(
            f"resuming: {already} of {len(files)} pictures already captioned in {output}, "
            f"{len(todo)} to go",
            file=sys.stderr,
        )
    if seed is not None:
        import mlx.core as mx

        mx.random.seed(seed)
    template_prompt = processor.format_prompt(prompt, num_images=1)
    out = sys.stdout if to_stdout else _open_for_append(output)
    meter = Progress(len(todo), "captioned", "images", enabled=progress)
    written = skipped = 0
    try:
        for batch in _batches(todo, batch_size):
            names, pictures = [], []
            for name in batch:
                try:
                    pictures.append(load_image(root / name))
                    names.append(name)
                except ImageLoadError as e:
                    skipped += 1
                    meter.message(f"warning: skipping {name}: {e}")
            if names:
                answers = batch_generate(
                    model,
                    processor,
                    [template_prompt] * len(names),
                    images=pictures,
                    **sampling,
                )
                for name, answer in zip(names, answers):
                    record = {"file": name, "prompt": prompt, "answer": answer.strip()}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                written += len(names)
            meter.update(written, f", {skipped} skipped" if skipped else "")
    finally:
        meter.close()
        if not to_stdout:
            out.close()
    return written
