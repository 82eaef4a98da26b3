"""Chat messages of either API -> the checkpoint's prompt and the pictures, in order.

The whole conversation is rendered with the checkpoint's conversation template each turn
(`mlx_llava.chat.session_template` + `mlx_llava.conversation.render`), every picture where its
message put it (one `<image>` each, in front of the message's text unless the text places its
own), so that a conversation that goes on about a picture renders the same prefix every turn and
the worker's prompt cache finds it. Pictures are fetched and decoded here under the server's
policy: data URLs always, http(s) only when allowed, files only inside one folder.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ..chat import session_template
from ..conversation import IMAGE_TOKEN, render
from ..image_io import (
    DEFAULT_MAX_IMAGE_PIXELS,
    FetchPolicy,
    ImageFetchError,
    ImageLoadError,
    decode_image,
    load_image,
)
from ..processor import VIDEO_PLACEHOLDER, Processor
from ..video_io import VideoLoadError, decode_video, load_video, read_video
from .schemas import RequestError

log = logging.getLogger("mlx_llava.server")
_EXAMPLES = {"image": "data:image/png;base64,...", "video": "data:video/mp4;base64,..."}


@dataclass
class Message:
    """One chat message: a role ("system", "user" or "assistant"), text, decoded pictures and
    videos (uint8 frames [T, H, W, 3])."""

    role: str
    text: str = ""
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)


@dataclass
class ImagePolicy:
    """Where pictures may come from, and how big they may be.

    Attributes:
        allow_remote: fetch http(s) URLs (off by default: the server would fetch whatever a
            client names). Hosts that resolve to a loopback, private, link-local or other
            non-public address are refused, redirects (at most 3) are checked the same way, and
            a client is told only "not reachable or not allowed" (the reason goes to the log).
        allow_private_hosts: also fetch from non-public addresses (this machine, its network,
            cloud metadata services): only for a server that its clients may not misuse.
        image_dir: local paths and file:// URLs are read only inside this folder (none without).
        timeout: seconds a remote picture may take to arrive, in all.
        max_bytes: the most bytes of an encoded picture from a URL or a file (data URLs are
            bounded by the request body limit).
        max_pixels: the most pixels of any picture, checked before it is decoded.
    """

    allow_remote: bool = False
    allow_private_hosts: bool = False
    image_dir: Optional[Path] = None
    timeout: float = 10.0
    max_bytes: int = 20 << 20
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def load(self, source: str, param: str) -> Image.Image:
        """Decode a picture named by a data URL, an http(s) URL, a file:// URL or a path.

        Raises:
            RequestError: the source is refused, malformed, too big or not a picture.
        """
        try:
            if source.startswith("data:"):
                return decode_image(self._data_url(source, param), "data URL", self.max_pixels)
            if source.startswith(("http://", "https://")):
                fetch = self._fetch_policy(param)
                return load_image(source, self.timeout, self.max_bytes, self.max_pixels, fetch)
            path = self._local_file(source, param)
            return load_image(str(path), max_pixels=self.max_pixels)
        except ImageFetchError as e:
            log.info("image URL '%s' not fetched: %s", source, e.detail)
            raise RequestError(str(e), param, "invalid_image") from None
        except ImageLoadError as e:
            raise RequestError(str(e), param, "invalid_image") from e

    def load_video(self, source: str, param: str, num_frames: int) -> np.ndarray:
        """`num_frames` frames [T, H, W, 3] of a video named as `load` names pictures, under
        the same policy and byte limit.

        Raises:
            RequestError: the source is refused, malformed, too big or not a video.
        """
        try:
            if source.startswith("data:"):
                data = self._data_url(source, param, "video")
                return decode_video(data, "data URL", num_frames)
            if source.startswith(("http://", "https://")):
                fetch = self._fetch_policy(param, "video")
                return load_video(source, num_frames, self.timeout, self.max_bytes, fetch)
            return read_video(self._local_file(source, param, "video"), num_frames)
        except ImageFetchError as e:
            log.info("video URL '%s' not fetched: %s", source, e.detail)
            raise RequestError(str(e), param, "invalid_video") from None
        except (ImageLoadError, VideoLoadError) as e:
            raise RequestError(str(e), param, "invalid_video") from e

    def _fetch_policy(self, param: str, kind: str = "image") -> FetchPolicy:
        if not self.allow_remote:
            what = "picture" if kind == "image" else kind
            raise RequestError(
                f"{kind} URLs are refused: send the {what} as a data URL "
                f"({_EXAMPLES[kind]}), or start the server with --allow-remote-images",
                param,
                f"{kind}_url_refused",
            )
        return FetchPolicy(public_only=not self.allow_private_hosts, uniform_errors=True)

    def _local_file(self, source: str, param: str, kind: str = "image") -> Path:
        path = self._local_path(source, param)
        if path.is_file() and path.stat().st_size > self.max_bytes:
            error = ImageLoadError if kind == "image" else VideoLoadError
            raise error(
                f"cannot read {kind} '{source}': more than the limit of {self.max_bytes} bytes"
            )
        return path

    def load_base64(self, data: str, param: str) -> Image.Image:
        """Decode a picture sent as bare base64 (Ollama's `images`) or as a data URL."""
        if data.startswith("data:"):
            return self.load(data, param)
        try:
            return decode_image(_b64decode(data, param), "base64 picture", self.max_pixels)
        except ImageLoadError as e:
            raise RequestError(str(e), param, "invalid_image") from e

    @staticmethod
    def _data_url(url: str, param: str, kind: str = "image") -> bytes:
        header, comma, payload = url[len("data:") :].partition(",")
        media_type, *options = header.split(";")
        if not comma or "base64" not in options:
            raise RequestError(
                f"{kind} data URLs must be base64: {_EXAMPLES[kind]}", param, f"invalid_{kind}"
            )
        if not media_type.startswith(f"{kind}/"):
            what = "a picture" if kind == "image" else "a video"
            raise RequestError(
                f"the data URL holds {media_type or 'no media type'}, not {what} ({kind}/...)",
                param,
                f"invalid_{kind}",
            )
        return _b64decode(payload, param)

    def _local_path(self, source: str, param: str) -> Path:
        if source.startswith("file://"):
            source = urllib.parse.unquote(urllib.parse.urlparse(source).path)
        elif "://" in source:
            raise RequestError(
                f"unsupported picture URL scheme: {source.split('://')[0]}://",
                param,
                "invalid_image",
            )
        if self.image_dir is None:
            raise RequestError(
                "local picture paths are refused: send the picture as a data URL, or start the "
                "server with --image-dir DIR to allow files inside DIR",
                param,
                "image_url_refused",
            )
        root = self.image_dir.resolve()
        path = (root / source).resolve()  # an absolute source replaces root
        if not path.is_relative_to(root):
            raise RequestError(
                f"picture paths must lie inside the --image-dir folder ({root})",
                param,
                "image_url_refused",
            )
        return path


def _b64decode(data: str, param: str) -> bytes:
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"malformed base64 picture data: {e}", param, "invalid_image") from e


def render_conversation(
    processor: Processor, messages: Sequence[Message], param: str = "messages"
) -> tuple[str, list]:
    """The prompt of a conversation that the model answers next, and its pictures in order
    (its videos, `Message.videos` of the user messages in order, each get a `<video>` in front
    of their message's text, after its pictures', unless the text places its own).

    System messages replace the template's system prompt (joined by newlines); consecutive
    messages of one role are joined; empty assistant messages are skipped; assistant answers are
    stripped of surrounding whitespace, as `ChatSession` keeps them. A message's pictures go in
    front of its text, one `<image>` each, unless its text holds as many `<image>` as it has
    pictures.

    Raises:
        RequestError: placeholders and pictures differ, pictures outside user messages, no
            user message last, an empty user message.
    """
    system, turns = [], []
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        placeholders = m.text.count(IMAGE_TOKEN)
        if m.role != "user" and (placeholders or m.images):
            raise RequestError(f"only user messages may hold pictures or <image> ({where})", where)
        if m.role != "user" and m.videos:
            raise RequestError(f"only user messages may hold videos ({where})", where)
        if m.role == "system":
            system.append(m.text)
            continue
        text = m.text.strip() if m.role == "assistant" else m.text
        if m.role == "assistant" and not text:
            continue
        if m.role == "user":
            if m.videos and VIDEO_PLACEHOLDER not in text:  # as `ChatSession`: after pictures
                text = (VIDEO_PLACEHOLDER + "\n") * len(m.videos) + text
            if placeholders == 0:
                text = (IMAGE_TOKEN + "\n") * len(m.images) + text
            elif placeholders != len(m.images):
                raise RequestError(
                    f"{where} has {placeholders} <image> placeholder(s) but "
                    f"{len(m.images)} picture(s)",
                    where,
                )
            if not text.strip():
                raise RequestError(f"{where} is empty: no text and no picture", where)
        if turns and turns[-1][0] == m.role:
            turns[-1] = (m.role, turns[-1][1] + "\n" + text, turns[-1][2] + list(m.images))
        else:
            turns.append((m.role, text, list(m.images)))
    if not turns or turns[-1][0] != "user":
        raise RequestError("the conversation must end with a user message", param)
    if turns[0][0] != "user":
        raise RequestError("the conversation must start with a user message", param)
    template = session_template(processor)
    if system:
        template = dataclasses.replace(template, system="\n".join(system))
    prompt = render(template, [(role, text) for role, text, _ in turns])
    return prompt, [p for _, _, pictures in turns for p in pictures]
