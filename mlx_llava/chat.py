"""A conversation about pictures: each turn renders the whole chat and reuses the KV cache.

Every turn renders all messages with the checkpoint's conversation template, exactly as the
model was trained, and generates with one `PromptCache` kept for the session: the prefix the
cache already holds (the system prompt, the picture's tokens, the earlier turns and answers)
is not computed again, so the picture is encoded once and a turn costs only its new tokens.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from .conversation import IMAGE_TOKEN, Template, get_template, render, template_for_jinja
from .generate import GenerationResponse, stream_generate
from .image_io import load_image
from .model import Model
from .processor import VIDEO_PLACEHOLDER, ImageInput, Processor
from .prompt import PromptCache, context_room, image_list
from .video_io import DEFAULT_NUM_FRAMES, VideoInput, read_video


def session_template(
    processor: Processor, conv_mode: Optional[Union[str, Template]] = None
) -> Template:
    """The template a chat renders with.

    An explicit `conv_mode` (a name or a `Template`), else the converter's recorded one, else
    chatml when the checkpoint's Jinja template speaks `<|im_start|>`, else llava-hf's
    `USER: ... ASSISTANT:` format. For llava-hf the answer separator is `</s>`, as LLaVA-1.5
    was trained (vicuna_v1's sep2), not the space llava-hf's Jinja template writes after an
    answer: ` {answer}</s>USER: {question} ASSISTANT:`. Single-turn prompts are the same.
    The processor's `system` (an Ollama model's `SYSTEM`), when it has one, is the system prompt.
    Pass a `Template` object to use a template as it is.
    """
    if isinstance(conv_mode, Template):
        return conv_mode
    mode = conv_mode or processor.config.conv_mode or template_for_jinja(processor.chat_template)
    template = get_template(mode)
    if template.name == "llava_hf":
        template = dataclasses.replace(template, sep2="</s>")
    if processor.system is not None:
        template = dataclasses.replace(template, system=processor.system)
    return template


def _load_images(image, images) -> list:
    return [load_image(i) for i in image_list(image, images)]


class ChatSession:
    """A multi-turn conversation about zero or more pictures.

    Example:
        >>> chat = ChatSession(model, processor, image="cat.jpg")
        >>> chat.send("What is in the picture?")
        >>> chat.send("What colour is it?")  # computes only this turn's new tokens

    Attributes:
        messages: the conversation so far, `(role, text)` pairs as rendered: the first user
            message carries the `<image>` placeholders; answers are stripped of surrounding
            whitespace, as the original LLaVA CLI keeps them.
        template: the conversation template (see `session_template`).
        cache: the session's `PromptCache` (`cache.length` positions held).
        images: the conversation's pictures (PIL images), in placeholder order.
        video: the conversation's video (OneVision, NeXT-Video): its frames, or None.

    A turn whose prompt does not fit the model's context (`max_position_embeddings`) raises
    ValueError and changes nothing; old turns are not trimmed. An answer is capped to the
    positions the context has left.
    """

    def __init__(
        self,
        model: Model,
        processor: Processor,
        image: Optional[ImageInput] = None,
        images: Optional[Sequence[ImageInput]] = None,
        system: Optional[str] = None,
        conv_mode: Optional[Union[str, Template]] = None,
        video: Optional[VideoInput] = None,
        num_frames: int = DEFAULT_NUM_FRAMES,
    ):
        self.model = model
        self.processor = processor
        template = session_template(processor, conv_mode)
        if system is not None:
            template = dataclasses.replace(template, system=system)
        self.template = template
        self.images = _load_images(image, images)
        # A file is read once: its frames [T, H, W, 3] serve every turn.
        self.video = read_video(video, num_frames) if isinstance(video, (str, Path)) else video
        self.cache = PromptCache(model)
        self.messages: list[tuple[str, str]] = []

    def set_image(
        self, image: Optional[ImageInput] = None, images: Optional[Sequence[ImageInput]] = None
    ) -> None:
        """Talk about other pictures (None: none): starts a new conversation."""
        self.images = _load_images(image, images)
        self.clear()

    def clear(self) -> None:
        """Start a new conversation about the same pictures (the cache is kept: its prefix,
        such as the pictures' tokens, is still reused)."""
        self.messages = []

    def prompt(self, text: str) -> tuple[list[tuple[str, str]], str]:
        """The messages and the rendered prompt for asking `text` next."""
        if not self.messages and self.video is not None and VIDEO_PLACEHOLDER not in text:
            text = VIDEO_PLACEHOLDER + "\n" + text
        if not self.messages and self.images and IMAGE_TOKEN not in text:
            text = (IMAGE_TOKEN + "\n") * len(self.images) + text
        messages = self.messages + [("user", text)]
        return messages, render(self.template, messages)

    def stream(self, text: str, **sampling) -> Iterator[GenerationResponse]:
        """Ask `text`; the answer streams. Keyword arguments as for `stream_generate`.

        The turn (question and the answer so far) is recorded when the stream ends, is closed
        or is interrupted after its first token.

        Raises:
            ValueError: the conversation does not fit the model's context.
        """
        messages, prompt = self.prompt(text)
        sizes = [(image.height, image.width) for image in self.images]
        frames = [] if self.video is None else [len(self.video)]
        length = len(self.processor.tokenize(prompt, image_sizes=sizes, video_frames=frames))
        try:
            room = context_room(self.model, length, "the conversation")
        except ValueError as e:
            raise ValueError(f"{e}: /clear to start over") from None
        sampling["max_tokens"] = min(sampling.get("max_tokens", 256), room)
        responses = stream_generate(
            self.model,
            self.processor,
            prompt,
            images=self.images,
            prompt_cache=self.cache,
            video=self.video,
            **sampling,
        )
        return self._run(messages, responses)

    def _run(self, messages, responses) -> Iterator[GenerationResponse]:
        answer, started = "", False
        try:
            for response in responses:
                started = True
                answer += response.text
                yield response
        finally:
            responses.close()  # stream_generate then records what the cache holds
            if started:
                self.messages = messages + [("assistant", answer.strip())]

    def send(self, text: str, **sampling) -> str:
        """Ask `text`; return the whole answer. Keyword arguments as for `stream_generate`."""
        return "".join(r.text for r in self.stream(text, **sampling))
