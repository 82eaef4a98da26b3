"""Folders replaced by renames, so that a crash at any moment leaves the old or the new one.

A folder is written under a staging name beside its target and renamed into place:

    .NAME.new    being written (incomplete: thrown away by `recover_dir`)
    .NAME.ready  complete, not yet in place
    NAME         the target
    .NAME.old    the previous target, while the new one moves in

`replace_dir` moves `.NAME.new` -> `.NAME.ready`, then `NAME` -> `.NAME.old`, then
`.NAME.ready` -> `NAME`, then deletes `.NAME.old`: each step is one rename. `recover_dir`
finishes (or undoes) whatever an interrupted `replace_dir` left, so readers call it first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

# A hook for tests that kill the process between the steps of `replace_dir`.
_after_step: Callable[[str], None] = lambda step: None  # noqa: E731


def _sibling(target: Path, suffix: str) -> Path:
    return target.parent / f".{target.name}.{suffix}"


def staging_dir(target: Path) -> Path:
    """A new, empty folder to write `target`'s new contents into (created with the user's
    usual permissions)."""
    target = Path(target)
    recover_dir(target)
    staged = _sibling(target, "new")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    return staged


def _fsync_tree(folder: Path) -> None:
    """Flush the folder's files to disk before they are renamed into place."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(staged: Path, target: Path) -> Path:
    """Put the complete folder `staged` (from `staging_dir`) in place of `target`."""
    target = Path(target)
    ready, old = _sibling(target, "ready"), _sibling(target, "old")
    _fsync_tree(staged)
    os.rename(staged, ready)
    _after_step("ready")
    if target.exists():
        os.rename(target, old)
        _after_step("retired")
    os.rename(ready, target)
    _fsync_dir(target.parent)
    _after_step("installed")
    shutil.rmtree(old, ignore_errors=True)
    return target


def recover_dir(target: Path) -> None:
    """Finish or undo an interrupted `replace_dir`: afterwards `target` is the old folder or
    the new one (or absent, if there was neither), and no staging folder is left."""
    target = Path(target)
    new, ready, old = (_sibling(target, s) for s in ("new", "ready", "old"))
    if new.exists():
        shutil.rmtree(new)
    if ready.exists():
        if target.exists():
            if old.exists():
                shutil.rmtree(old)
            os.rename(target, old)
        os.rename(ready, target)
    elif old.exists() and not target.exists():
        os.rename(old, target)
    if old.exists():
        shutil.rmtree(old)


def write_file_atomic(path: Path, data: bytes | str) -> None:
    """Write a file under a temporary name and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    mode = "w" if isinstance(data, str) else "wb"
    with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
