"""Prompt + pictures -> model inputs: token ids with each `<image>` expanded, and pixels."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .config import ModelConfig
from .conversation import format_prompt, get_template
from .gguf import GGUFModel, load_hf_tokenizer, original_tokenizer
from .image_processor import CLIPImageProcessor, image_processor_from_dict
from .llama_tokenizer import SlowLlamaTokenizer, Span, is_slow_llama_folder
from .video_io import DEFAULT_NUM_FRAMES, VideoInput, read_video

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
# The only processor files that may come from a folder after the checkpoint's own (an original
# release's vision tower): the tokenizer and the rest belong to the language model's checkpoint.
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")

ImageInput = Any  # a PIL image, a file path or an http(s) URL


def find_processor_file(folders: Sequence[Path], name: str) -> Optional[Path]:
    """`folders[0]/name` (the checkpoint's own file) if it exists; for the image processor's
    settings, else the first later folder that has it (an original release's CLIP tower, whose
    own tokenizer files are CLIP's and never used)."""
    candidates = folders if name in IMAGE_PROCESSOR_FILES else folders[:1]
    return next((Path(f) / name for f in candidates if (Path(f) / name).exists()), None)


class Processor:
    """LlavaProcessor's (and LlavaNextProcessor's) job, owned here: tokenization, `<image>`
    expansion and preprocessing.

    Each `<image>` becomes its picture's `config.image_tokens(size)` copies of
    `config.image_token_index` (`config.num_image_tokens` for every LLaVA-1.5 picture).
    Tokenizers that know `<image>` (llava-hf) tokenize the whole prompt, as transformers does;
    the others (original releases) follow the original `tokenizer_image_token`: the prompt is
    split at `<image>`, each chunk tokenized, BOS kept on the first chunk only. A SentencePiece
    `tokenizer.model` of an original release encodes as transformers 4.31's slow LlamaTokenizer
    did (`original_tokenizer`); `tokenizer` decodes, streams and knows EOS in every case.
    `_encode` is the one place that chooses among them, for inference and training alike.
    """

    def __init__(
        self,
        tokenizer: TokenizerWrapper,
        image_processor: CLIPImageProcessor,
        config: ModelConfig,
        chat_template: Optional[str] = None,
        original_tokenizer: Optional[SlowLlamaTokenizer] = None,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.chat_template = chat_template
        vocab = tokenizer.get_vocab()
        self.image_token_in_vocab = vocab.get(IMAGE_PLACEHOLDER) == config.image_token_index
        video_id = config.video_token_index
        if config.has_video and video_id >= 0 and vocab.get(VIDEO_PLACEHOLDER) != video_id:
            raise ValueError(
                f"the tokenizer's {VIDEO_PLACEHOLDER} is not the model's video_token_index "
                f"{config.video_token_index}"
            )
        self.original_tokenizer = original_tokenizer
        self.stop: list[str] = []  # strings that end every answer (an Ollama model's `stop`)
        self.system: Optional[str] = None  # the template's system prompt (an Ollama `SYSTEM`)

    @classmethod
    def from_pretrained(
        cls,
        folders: Union[str, Path, Sequence[Union[str, Path]]],
        config: ModelConfig,
        pad_to_square: Optional[bool] = None,
    ) -> "Processor":
        """Read the tokenizer and chat template from the checkpoint's folder (`folders[0]`) and
        `preprocessor_config.json` from the first of `folders` that has it (original releases
        keep the image processor's settings beside their CLIP tower)."""
        if isinstance(folders, (str, Path)):
            folders = [folders]
        folders = [Path(f) for f in folders]
        if not any((folders[0] / n).exists() for n in TOKENIZER_FILES):
            raise FileNotFoundError(f"no tokenizer files in {folders[0]}")
        tokenizer = load_tokenizer(folders[0])
        original = None
        if config.image_token_index < 0 and is_slow_llama_folder(folders[0]):
            original = SlowLlamaTokenizer.from_folder(folders[0])
        preprocessor = find_processor_file(folders, "preprocessor_config.json")
        if preprocessor:
            with open(preprocessor) as f:
                settings = json.load(f)
        else:
            side = config.vision_config.image_size
            settings = {"size": {"shortest_edge": side}, "crop_size": side}
        image_processor = _image_processor(settings, config, pad_to_square)
        own = (folders[0] / n for n in CHAT_TEMPLATE_FILES)
        template_file = next((f for f in own if f.exists()), None)
        chat_template = None
        if template_file is not None and template_file.suffix == ".json":
            with open(template_file) as f:
                chat_template = json.load(f).get("chat_template")
        elif template_file is not None:
            chat_template = template_file.read_text()
        return cls(tokenizer, image_processor, config, chat_template, original)

    @classmethod
    def from_gguf(cls, model: GGUFModel, pad_to_square: Optional[bool] = None) -> "Processor":
        """The processor of a GGUF pair: transformers' tokenizer of the GGUF's vocabulary for
        decoding, the original code's ids for encoding (see `gguf.original_tokenizer`), the
        mmproj's image settings."""
        tokenizer = load_hf_tokenizer(model)
        image_processor = _image_processor(model.image_settings, model.config, pad_to_square)
        original = original_tokenizer(model.text_metadata)
        return cls(tokenizer, image_processor, model.config, None, original)

    # Prompts -----------------------------------------------------------------------------

    def format_prompt(
        self, question: str, num_images: int = 1, conv_mode: Optional[str] = None
    ) -> str:
        """Wrap a user's question in the checkpoint's conversation template.

        `<image>` placeholders are put in front of the question unless the user wrote them.
        An explicit `conv_mode`, else the converter's recorded one, else the checkpoint's chat
        template, else llava-hf's `USER: <image>\\n{question} ASSISTANT:`.
        """
        mode = conv_mode or self.config.conv_mode
        if mode or not self.chat_template:
            template = get_template(mode or "llava_hf")
            if self.system is not None:
                template = dataclasses.replace(template, system=self.system)
            return format_prompt(question, template, num_images)
        if IMAGE_PLACEHOLDER in question:
            num_images = 0
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=False,
        )

    # Tokens -------------------------------------------------------------------------------

    def image_token_counts(
        self, num_images: int, image_sizes: Optional[Sequence[tuple[int, int]]] = None
    ) -> list[int]:
        """The image tokens of each of `num_images` pictures of one prompt (the tiled models:
        of these sizes; OneVision tiles a picture only when it is alone in its prompt)."""
        if not self.config.is_next:
            return [self.config.num_image_tokens] * num_images
        if num_images and (image_sizes is None or len(image_sizes) != num_images):
            raise ValueError(
                f"{self.config.model_type} counts each picture's tokens from its size: "
                f"{num_images} <image> placeholder(s) need as many image sizes, got "
                f"{len(image_sizes or [])}"
            )
        return [self.config.image_tokens(s, num_images == 1) for s in image_sizes or []]

    def tokenize(
        self,
        text: str,
        add_bos: bool = True,
        image_sizes: Optional[Sequence[tuple[int, int]]] = None,
        video_frames: Sequence[int] = (),
    ) -> list[int]:
        """Token ids of one prompt, each `<image>` expanded to its picture's token count and
        each `<video>` to its video's.

        `add_bos=False` for text that continues a prompt already in a KV cache. `image_sizes`
        ((height, width) of each picture, in placeholder order) is needed for the tiled models;
        `video_frames` holds each video's frame count.
        """
        ids, _ = self._encode(text, add_bos, offsets=False)
        counts = {
            self.config.image_token_index: iter(
                self.image_token_counts(text.count(IMAGE_PLACEHOLDER), image_sizes)
            )
        }
        if self.config.has_video:
            if len(video_frames) != text.count(VIDEO_PLACEHOLDER):
                raise ValueError(
                    f"the prompt has {text.count(VIDEO_PLACEHOLDER)} {VIDEO_PLACEHOLDER} "
                    f"placeholder(s) but {len(video_frames)} video(s) were given"
                )
            counts[self.config.video_token_index] = iter(
                self.config.video_tokens(f) for f in video_frames
            )
        out: list[int] = []
        for t in ids:
            out.extend([t] * next(counts[t]) if t in counts else [t])
        return out

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[Span]]:
        """Token ids of a prompt as `tokenize` makes them before the image expansion (one
        `config.image_token_index` per `<image>`), with each token's character span in `text`
        (empty for BOS); training's answer mask is made from the spans.

        Raises:
            ValueError: a llava-hf tokenizer without a tokenizer.json (no offsets).
        """
        return self._encode(text, add_bos=True, offsets=True)

    def _encode(self, text: str, add_bos: bool, offsets: bool) -> tuple[list[int], list[Span]]:
        """Ids before the image expansion, and their spans when `offsets` (else [])."""
        if self.image_token_in_vocab:
            return _encode_chunk(self.tokenizer, text, add_bos, offsets)
        encoder = self.original_tokenizer or self.tokenizer
        placeholders = {IMAGE_PLACEHOLDER: self.config.image_token_index}
        if self.config.has_video and self.config.video_token_index < 0:  # lmms-lab OneVision
            placeholders[VIDEO_PLACEHOLDER] = self.config.video_token_index
        parts = re.split("(" + "|".join(map(re.escape, placeholders)) + ")", text)
        ids, spans, pos = [], [], 0
        for i, part in enumerate(parts):  # chunk, placeholder, chunk, ...
            if i % 2:
                ids.append(placeholders[part])
                spans.append((pos, pos + len(part)))
            else:
                chunk_ids, chunk_spans = _encode_chunk(encoder, part, add_bos and i == 0, offsets)
                ids += chunk_ids
                spans += [(a + pos, b + pos) for a, b in chunk_spans]
            pos += len(part)
        return ids, spans if offsets else []

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        images: Optional[Union[ImageInput, Sequence[ImageInput]]] = None,
        add_bos: bool = True,
        pixel_values: Optional[mx.array] = None,
        image_sizes: Optional[Sequence[tuple[int, int]]] = None,
        videos: Optional[Sequence[VideoInput]] = None,
        num_frames: int = DEFAULT_NUM_FRAMES,
    ) -> dict[str, Any]:
        """Model inputs for one prompt or a batch.

        Args:
            text: a prompt, or a list of prompts (left-padded to one length).
            images: the pictures for the `<image>` placeholders, in order across the batch.
            add_bos: False for text that continues a prompt already in a KV cache.
            pixel_values, image_sizes: `images` already preprocessed (as this processor does),
                used as given.
            videos: the videos for the `<video>` placeholders (OneVision, LLaVA-NeXT-Video), in
                order: files (`num_frames` frames sampled uniformly), uint8 arrays
                [T, H, W, 3] or lists of pictures.

        Returns:
            `input_ids` [B, L] int32, `attention_mask` [B, L] int32 (0 on padding),
            `pixel_values` [n, H, W, 3] float32 (one per picture; the tiled models: each
            picture's tiles), or None without images, `image_sizes`: (height, width) per
            picture for the tiled models, else None; with videos `pixel_values_videos`
            [V, F, H, W, 3] float32 (a list of [F_i, H, W, 3] when their lengths differ),
            for OneVision `batch_num_images` (pictures per prompt).
            Pass them on to `Model` as keywords: `model(**inputs)`.

        Raises:
            ValueError: the number of `<image>` (`<video>`) placeholders differs from the
                number of images (videos).
        """
        prompts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        placeholders = sum(p.count(IMAGE_PLACEHOLDER) for p in prompts)
        if placeholders != len(images):
            raise ValueError(
                f"the prompt has {placeholders} <image> placeholder(s) but {len(images)} "
                "image(s) were given"
            )
        batch_num_images = [p.count(IMAGE_PLACEHOLDER) for p in prompts if IMAGE_PLACEHOLDER in p]
        if pixel_values is None and images:
            if self.config.model_type == "llava_onevision":
                alone = [n == 1 for n in batch_num_images for _ in range(n)]
                pixels, image_sizes = self.image_processor.preprocess(list(images), alone)
            else:
                pixels, image_sizes = self.image_processor.preprocess(list(images))
            pixel_values = mx.array(pixels)
        frames = self.video_frames(videos or [], num_frames)
        video_counts = [p.count(VIDEO_PLACEHOLDER) for p in prompts]
        if sum(video_counts) != len(frames) and (frames or self.config.has_video):
            raise ValueError(
                f"the prompt has {sum(video_counts)} {VIDEO_PLACEHOLDER} placeholder(s) but "
                f"{len(frames)} video(s) were given"
            )
        ids, seen, seen_videos = [], 0, 0
        for p, v in zip(prompts, video_counts):
            n = p.count(IMAGE_PLACEHOLDER)
            sizes = None if image_sizes is None else list(image_sizes)[seen : seen + n]
            lengths = [f.shape[0] for f in frames[seen_videos : seen_videos + v]]
            ids.append(self.tokenize(p, add_bos, sizes, lengths))
            seen, seen_videos = seen + n, seen_videos + v
        input_ids, attention_mask = left_pad(ids, self.pad_token_id)
        out = {
            "input_ids": mx.array(input_ids),
            "attention_mask": mx.array(attention_mask),
            "pixel_values": pixel_values,
            "image_sizes": None if image_sizes is None else [tuple(s) for s in image_sizes],
        }
        if self.config.model_type == "llava_onevision":
            out["batch_num_images"] = batch_num_images
        if len({f.shape for f in frames}) == 1:
            out["pixel_values_videos"] = mx.array(np.stack(frames))
        elif frames:  # videos of different lengths
            out["pixel_values_videos"] = [mx.array(f) for f in frames]
        return out

    def video_frames(self, videos: Sequence[VideoInput], num_frames: int) -> list[np.ndarray]:
        """Each video's preprocessed frames [T, H, W, 3] float32 (files: `num_frames` frames
        sampled uniformly over the clip)."""
        if videos and not self.config.has_video:
            raise ValueError(f"{self.config.model_type} does not see videos")
        out = []
        for video in videos:
            if isinstance(video, (str, Path)):
                video = read_video(video, num_frames)
            out.append(self.image_processor.preprocess_frames(video))
        return out

    @property
    def pad_token_id(self) -> int:
        for candidate in (self.config.pad_token_id, self.tokenizer.pad_token_id):
            if candidate is not None and candidate >= 0:
                return candidate
        return 0

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _image_processor(
    settings: dict, config: ModelConfig, pad_to_square: Optional[bool]
) -> CLIPImageProcessor:
    image_processor = image_processor_from_dict(settings, config)
    if pad_to_square and config.is_next:
        raise ValueError("pad to square does not apply to LLaVA-NeXT: it tiles each picture")
    if pad_to_square is None:
        pad_to_square = config.image_aspect_ratio == "pad"
    image_processor.pad_to_square = pad_to_square
    return image_processor


def _encode_chunk(
    encoder: Union[TokenizerWrapper, SlowLlamaTokenizer],
    text: str,
    add_special: bool,
    offsets: bool,
) -> tuple[list[int], list[Span]]:
    """`encoder`'s ids of `text`, with their character spans when `offsets`."""
    if not offsets:
        return encoder.encode(text, add_special_tokens=add_special), []
    if isinstance(encoder, SlowLlamaTokenizer):
        return encoder.encode_with_offsets(text, add_special)
    fast = getattr(encoder, "_tokenizer", encoder)
    if not getattr(fast, "is_fast", False):
        raise ValueError("training needs a fast (tokenizer.json) tokenizer for the answer mask")
    encoded = fast(text, add_special_tokens=add_special, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def left_pad(sequences: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad sequences to one length: ids [B, L] int32 and attention mask [B, L] int32."""
    length = max(len(s) for s in sequences)
    ids = np.full((len(sequences), length), pad, dtype=np.int32)
    mask = np.zeros((len(sequences), length), dtype=np.int32)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, length - len(seq) :] = seq
            mask[row, length - len(seq) :] = 1
    return ids, mask
