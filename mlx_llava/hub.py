"""Where a model name points: a local folder, or a Hugging Face hub repo fetched into its cache."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
DEMO_PATH = Path(__file__).parent / "demo"
# The hub's rule: letters, digits, "-", "_", "." but no "--" or "..", and neither part begins
# or ends with "-" or ".". So "./model" or "runs/.." are paths, never repo ids.
_NAME = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")


def is_repo_id(name: str) -> bool:
    """'org/name' as the hub spells repo ids, and not an existing path."""
    return (
        bool(_REPO_ID.match(name))
        and "--" not in name
        and ".." not in name
        and not Path(name).exists()
    )


def cache_dir() -> Path:
    """Where models converted from hub ids are kept (MLX_LLAVA_CACHE, else ~/.cache/mlx_llava)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx_llava"
    return Path(os.environ.get("MLX_LLAVA_CACHE", default))


def resolve_folder(name: Union[str, Path]) -> Path:
    """A local folder for `name`: "demo" (the bundled model), a folder, or a hub repo id
    (downloaded into the hub's cache).

    Raises:
        FileNotFoundError: a local path that does not exist, or a repo that cannot be fetched.
    """
    if str(name) == "demo":
        if not (DEMO_PATH / "config.json").exists():
            raise FileNotFoundError("the bundled demo model is missing from this installation")
        return DEMO_PATH
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"'{name}' is a file, not a model folder")
    if not is_repo_id(str(name)):
        raise FileNotFoundError(f"model folder '{name}' not found")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(str(name), allow_patterns=HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")):  # an older repo with PyTorch shards only
            folder = Path(snapshot_download(str(name), allow_patterns=HUB_PATTERNS + ["*.bin"]))
    except Exception as e:  # offline, unknown repo, gated repo, ... : all one message
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"model folder '{name}' not found, and it cannot be downloaded as a Hugging Face "
            f"hub repo id ({reason[:160]}); if you are offline, pass a local folder"
        ) from None
    return folder
