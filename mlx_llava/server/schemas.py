"""Request and response bodies of the OpenAI and Ollama APIs, as pydantic models named after the
APIs' own objects. Fields the server does not use are ignored, as the APIs' clients send many."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Schema = TypeVar("Schema", bound=BaseModel)


class RequestError(ValueError):
    """A client's mistake, answered with a 4xx and a JSON body (never a traceback)."""

    def __init__(
        self,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        status: int = 400,
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


MAX_JSON_DEPTH = 64  # objects and arrays nested in a request body


def parse_body(schema: type[Schema], body: bytes) -> Schema:
    """A request body as `schema`; RequestError (naming the field) for anything else: not
    JSON, nested deeper than `MAX_JSON_DEPTH`, numbers out of range (`1e999`, NaN, integers of
    thousands of digits), strings that are not Unicode text (a lone surrogate such as
    `"\\ud800"`, which JSON allows), a value of the wrong type."""
    try:
        data = json.loads(body, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too many digits, inf
        raise RequestError(f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object", code="invalid_json")
    _check_json_values(data)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise RequestError(f"{param or 'body'}: {first['msg']}", param, "invalid_value") from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _too_deep() -> RequestError:
    return RequestError(
        f"the body is nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json"
    )


def _check_json_values(data: dict) -> None:
    """Depth and text of every value, without recursion."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key)
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            _check_text(value)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            f"the body holds a string that is not Unicode text (a lone surrogate "
            f"{text[e.start]!a}, half of a UTF-16 pair)",
            code="invalid_json",
        ) from None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# OpenAI: /v1/chat/completions ----------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str
    detail: Optional[str] = None


class ImageURLPart(_Request):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


class VideoURLPart(_Request):
    type: Literal["video_url"]
    video_url: Union[ImageURL, str]

    @property
    def url(self) -> str:
        return self.video_url if isinstance(self.video_url, str) else self.video_url.url


ContentPart = Annotated[Union[TextPart, ImageURLPart, VideoURLPart], Field(discriminator="type")]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None

    def texts(self) -> list[str]:
        """The message's text parts."""
        if self.content is None or isinstance(self.content, str):
            return [self.content or ""]
        return [part.text for part in self.content if part.type == "text"]


class StreamOptions(_Request):
    include_usage: bool = False


class JSONSchemaFormat(_Request):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[Union[dict[str, Any], bool]] = Field(None, alias="schema")
    strict: Optional[bool] = None  # the schema is always enforced


class ResponseFormatRequest(_Request):
    """OpenAI's `response_format`: its type is checked by the route (an unknown one: 400)."""

    type: str
    json_schema: Optional[JSONSchemaFormat] = None


class ChatCompletionRequest(_Request):
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # Sampling: the ranges are checked by `SamplingParams` (one place for every API).
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[ResponseFormatRequest] = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]]


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: Optional[list[ChatCompletionTokenLogprob]]
    refusal: Optional[list[ChatCompletionTokenLogprob]] = None


class Choice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: Optional[str]
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChoiceDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChoiceDelta
    finish_reason: Optional[str] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlx-llava"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Ollama: /api/chat, /api/generate, /api/tags --------------------------------------------------


class OllamaOptions(_Request):
    """Ollama's sampling options; their ranges are checked by `SamplingParams`."""

    num_predict: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repeat_penalty: Optional[float] = None
    repeat_last_n: Optional[int] = None
    seed: Optional[int] = None
    stop: Optional[list[str]] = None


class OllamaMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str = ""
    images: Optional[list[str]] = None


class OllamaChatRequest(_Request):
    model: Optional[str] = None
    messages: list[OllamaMessage] = Field(default_factory=list)
    stream: bool = True
    options: Optional[OllamaOptions] = None
    format: Union[str, dict[str, Any], None] = None  # "json" or a JSON schema
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None


class OllamaGenerateRequest(_Request):
    model: Optional[str] = None
    prompt: str = ""
    system: Optional[str] = None
    images: Optional[list[str]] = None
    stream: bool = True
    options: Optional[OllamaOptions] = None
    format: Union[str, dict[str, Any], None] = None  # "json" or a JSON schema
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None


class OllamaTimings(BaseModel):
    """The closing fields of an Ollama answer; durations in nanoseconds."""

    done_reason: str
    total_duration: int
    load_duration: int
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int


class OllamaModelDetails(BaseModel):
    format: str = "safetensors"
    family: str = "llava"
    families: list[str] = ["llava", "clip"]
    parameter_size: str
    quantization_level: str


class OllamaModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaTags(BaseModel):
    models: list[OllamaModel]
