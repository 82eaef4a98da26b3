"""Ollama's model store: `ollama pull llava` keeps a LLaVA GGUF pair as blobs, listed by a
manifest. Read in place (nothing copied):

    $OLLAMA_MODELS (default ~/.ollama/models)/
        manifests/registry.ollama.ai/library/llava/latest     JSON: layers with mediaType, digest
        blobs/sha256-<hex>                                    the files the layers name
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import ConfigError

PREFIX = "ollama:"
REGISTRY = "registry.ollama.ai"
MEDIA_TYPE = "application/vnd.ollama.image."
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass
class OllamaModel:
    """The files and settings of one Ollama model: its GGUF pair, template and stop strings."""

    name: str
    model: Path
    projector: Path
    template: Optional[str] = None
    system: Optional[str] = None
    stop: list[str] = field(default_factory=list)


def is_ollama_name(name: str) -> bool:
    return str(name).startswith(PREFIX)


def store_dir() -> Path:
    """`$OLLAMA_MODELS`, else ~/.ollama/models."""
    return Path(os.environ.get("OLLAMA_MODELS", Path.home() / ".ollama" / "models")).expanduser()


def manifest_path(name: str, store: Path) -> Path:
    """The manifest of `llava`, `llava:7b-v1.6`, `user/model:tag` or `host/ns/model:tag`."""
    model, _, tag = name.partition(":")
    parts = model.split("/")
    if len(parts) == 1:
        parts = [REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [REGISTRY, *parts]
    if any(p in ("", ".", "..") for p in parts) or "/" in tag or tag in (".", ".."):
        raise ConfigError(f"'{name}' is not an Ollama model name")
    return store.joinpath("manifests", *parts, tag or "latest")


def find_model(name: str, store: Optional[Path] = None) -> OllamaModel:
    """Read the manifest of `name` ("ollama:llava" or "llava") and locate its blobs.

    Raises:
        FileNotFoundError: the model is not in the store, or a blob is missing.
        ConfigError: a manifest without a projector layer (not a vision model).
    """
    name = name[len(PREFIX) :] if is_ollama_name(name) else name
    store = store or store_dir()
    path = manifest_path(name, store)
    if not path.is_file():
        raise FileNotFoundError(f"Ollama model '{name}' not found in {store} (ollama pull {name})")
    try:
        manifest = json.loads(path.read_text())
        layers = {
            layer["mediaType"].removeprefix(MEDIA_TYPE): layer["digest"]
            for layer in manifest["layers"]
        }
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"the manifest of Ollama model '{name}' is not valid ({e})") from None
    if "model" not in layers:
        raise ConfigError(f"Ollama model '{name}' has no model layer")
    if "projector" not in layers:
        raise ConfigError(f"Ollama model '{name}' has no projector layer: not a LLaVA model")

    def blob(kind: str) -> Path:
        if not DIGEST.match(layers[kind]):
            raise ConfigError(f"Ollama model '{name}': bad {kind} digest '{layers[kind]}'")
        file = store / "blobs" / layers[kind].replace(":", "-")
        if not file.is_file():
            raise FileNotFoundError(f"Ollama model '{name}': its {kind} blob {file} is missing")
        return file

    def text(kind: str) -> Optional[str]:
        return blob(kind).read_text(encoding="utf-8") if kind in layers else None

    params = json.loads(text("params") or "{}")
    stop = params.get("stop") or []
    return OllamaModel(
        name,
        blob("model"),
        blob("projector"),
        text("template"),
        text("system"),
        [stop] if isinstance(stop, str) else list(stop),
    )
