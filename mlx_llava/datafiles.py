"""Data files of records that name pictures (LLaVA training data, evaluation questions)."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path, PureWindowsPath
from typing import Any, Union


class DataFileError(ValueError):
    """A data file that cannot be read or understood."""


def read_records(path: Union[str, Path]) -> Any:
    """The parsed contents of a JSON or JSON Lines file.

    Raises:
        DataFileError: the file is missing or is not valid JSON / JSONL.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise DataFileError(f"data file {what}: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataFileError(f"cannot read data file {path}: {e}") from e
    if path.suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):  # else several values: JSONL
                raise DataFileError(
                    f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
                ) from e
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFileError(
                    f"{path} line {lineno} is not valid JSON ({e.msg}, column {e.colno})"
                ) from e
    return records


def relative_picture(name: str, where: str) -> str:
    """The normalised relative path of a picture a record names inside the image folder.

    Records name pictures relative to the image folder; an absolute path or one whose `..`
    parts climb out of the folder is refused, so that a data file cannot make the program read
    arbitrary files. (Links inside the folder are followed as usual.)

    Raises:
        DataFileError: `name` is absolute or escapes the folder; the message names `where`.
    """
    normal = posixpath.normpath(name.replace("\\", "/"))
    if (
        posixpath.isabs(normal)
        or PureWindowsPath(name).drive
        or normal == ".."
        or normal.startswith("../")
    ):
        raise DataFileError(
            f"{where}: image '{name}' is not a path inside the image folder (absolute paths "
            "and '..' are refused)"
        )
    return normal
