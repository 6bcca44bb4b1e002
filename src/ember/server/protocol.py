"""The OpenAI API's request and response bodies (plus vLLM's sampling extras), as pydantic
models. The constraints mirror `SamplingParams`' checks, so the OpenAPI schema says exactly
what the server accepts.

No field is silently ignored: a field the models do not declare is refused (HTTP 400
`unsupported parameter: <name>`), except those of `IGNORED_FIELDS`, which change nothing
about the answer."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, WithJsonSchema,
    model_validator,
)

from ember.sampling_params import SamplingParams, StructuredOutputsParams

MAX_N = 128  # OpenAI's limit on choices per request
MAX_STOP = SamplingParams.MAX_STOP
NonEmptyStr = Annotated[str, Field(min_length=1)]
StopStr = Annotated[str, Field(min_length=1, max_length=SamplingParams.MAX_STOP_CHARS)]


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(**bounds: Any) -> Any:  # noqa: N802 (a type)
    """JSON Schema's integer within `bounds` (Field's ge, le, ...): 3 and 3.0, not "3" (the
    models are strict) nor true. The bounds come first, so that the schema shows them."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


# The schema's token ids get `maximum: vocab_size - 1` once the model is loaded (openapi.py).
TOKEN_ID_MARK = "x-ember-token-id"
TokenId = Int(ge=0, json_schema_extra={TOKEN_ID_MARK: True})


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a string with a lone UTF-16 surrogate (JSON's
    "\\ud800" escape): such a string is not Unicode text and cannot be tokenized."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


class _Request(BaseModel):
    # NaN and infinity are not JSON, but Python's json module accepts them.
    # Strict: "1" is not an integer, nor "true" a boolean, as the schema says.
    # Forbid: a field ember does not implement is refused by name, never dropped.
    model_config = ConfigDict(allow_inf_nan=False, strict=True, extra="forbid",
                              populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _unicode_text(cls, data: Any) -> Any:
        if _has_lone_surrogate(data):
            raise ValueError("the request holds a string with a lone surrogate (not Unicode)")
        return data


class StreamOptions(_Request):
    include_usage: bool = False


class StructuredOutputsRequest(_Request):
    """vLLM's `structured_outputs`: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema")
    regex: NonEmptyStr | None = None
    choice: Annotated[list[NonEmptyStr], Field(min_length=1)] | None = None
    grammar: NonEmptyStr | None = Field(None, description="Lark (llguidance's dialect) or GBNF")
    json_object: bool | None = None

    def to_params(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(json=self.json_, regex=self.regex, choice=self.choice,
                                       grammar=self.grammar, json_object=self.json_object)




def _false_only(value: bool | None) -> bool | None:
    if value:
        raise ValueError("ember stores nothing: store must be false")
    return value

# Fields accepted and ignored because they change nothing about the answer (OpenAI's
# bookkeeping and routing hints). `store` only when false: ember stores nothing.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "prompt_cache_key",
                  "safety_identifier")


class _SamplingRequest(_Request):
    """Fields shared by chat and text completions."""

    model: str | None = Field(None, description="the served model name (default: it)")
    n: Int(ge=1, le=MAX_N) | None = 1
    temperature: float | None = Field(None, ge=0.0, le=SamplingParams.MAX_TEMPERATURE,
                                      description="0 is greedy (default 1)")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: Int(ge=1) | None = None
    stop: StopStr | Annotated[list[StopStr], Field(max_length=MAX_STOP)] | None = None
    seed: Int() | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                     Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=SamplingParams.MAX_LOGIT_BIAS,
        description="token id (as a string) -> bias added to its logit")
    structured_outputs: StructuredOutputsRequest | None = None
    # Ignored (IGNORED_FIELDS): they change nothing about the answer.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: Annotated[StrictBool | None, AfterValidator(_false_only),
                     WithJsonSchema({"anyOf": [{"const": False}, {"type": "null"}]})] = Field(
        None, description="ember stores nothing: false only")
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # vLLM's extras
    top_k: Int(ge=-1) | None = Field(None, description="0 or -1 disables")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, ge=SamplingParams.MIN_REPETITION_PENALTY,
                                             le=SamplingParams.MAX_REPETITION_PENALTY)
    min_tokens: Int(ge=0) = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "_SamplingRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        raise NotImplementedError

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        return self.structured_outputs.to_params() if self.structured_outputs else None

    def to_sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        max_tokens = self.requested_max_tokens()
        opt = {
            k: v for k, v in (
                ("temperature", self.temperature), ("top_p", self.top_p),
                ("top_k", self.top_k), ("min_p", self.min_p),
                ("presence_penalty", self.presence_penalty),
                ("frequency_penalty", self.frequency_penalty),
                ("repetition_penalty", self.repetition_penalty),
            ) if v is not None
        }
        return SamplingParams(
            n=self.n or 1, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
            logprobs=self.requested_logprobs(), skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=self.logit_bias_ids(), structured_outputs=self.structured_outputs_params(),
            **opt,
        )

    def logit_bias_ids(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        return {int(k): v for k, v in self.logit_bias.items()}


# ---- chat -------------------------------------------------------------------------------
class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str = Field(..., description="the arguments, as a JSON text")


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _Message(_Request):
    role: str  # one Literal per subclass
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    # What an SDK echoes back of an assistant message: accepted only when empty.
    refusal: None = None
    annotations: list[Any] | None = Field(None, max_length=0)
    audio: None = None
    function_call: None = None

    def to_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        msg: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            msg["name"] = self.name
        return msg


class SystemMessage(_Message):
    role: Literal["system"]


class DeveloperMessage(_Message):
    role: Literal["developer"]


class UserMessage(_Message):
    role: Literal["user"]


class AssistantMessage(_Message):
    role: Literal["assistant"]
    tool_calls: list[ToolCall] | None = Field(None, description="the calls the assistant made")

    def to_template_dict(self) -> dict[str, Any]:
        msg = super().to_template_dict()
        if self.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return msg


class ToolMessage(_Message):
    role: Literal["tool"]
    tool_call_id: NonEmptyStr = Field(..., description="the call this message answers")

    def to_template_dict(self) -> dict[str, Any]:
        return {**super().to_template_dict(), "tool_call_id": self.tool_call_id}


# One type per role (OpenAI's shape): only an assistant message has tool_calls, only a tool
# message has (and needs) tool_call_id.
ChatMessage = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


class FunctionDefinition(_Request):
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema (an object)")
    strict: bool | None = Field(None, description="calls always follow the schema")


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Request):
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = Field(None, description="the output always follows the schema")


class ResponseFormatText(_Request):
    type: Literal["text"]


class ResponseFormatJsonObject(_Request):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


# One type per `type` (OpenAI's shape): json_schema comes with (and only with) its type.
ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
    Field(discriminator="type"),
]


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Int(ge=1) | None = Field(
        None, description="takes precedence over the deprecated max_tokens")
    logprobs: bool | None = False
    top_logprobs: Int(ge=0, le=SamplingParams.MAX_LOGPROBS) | None = None
    add_generation_prompt: bool = True
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs can only be set when logprobs is true")
        return self

    @model_validator(mode="after")
    def _one_constraint(self) -> "ChatCompletionRequest":
        constrained = [name for name, on in (
            ("response_format", self.response_format is not None
             and self.response_format.type != "text"),
            ("structured_outputs", self.structured_outputs is not None),
            ("tool_choice", self.tools and self.tool_choice != "none"),
        ) if on]
        if len(constrained) > 1:
            raise ValueError(f"{' and '.join(constrained)} cannot be combined: each "
                             "constrains the whole answer")
        return self

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        fmt = self.response_format
        if isinstance(fmt, ResponseFormatJsonObject):
            return StructuredOutputsParams(json_object=True)
        if isinstance(fmt, ResponseFormatJsonSchema):
            schema = fmt.json_schema.schema_
            if schema is None:  # OpenAI: no schema means any JSON object
                return StructuredOutputsParams(json_object=True)
            return StructuredOutputsParams(json=schema)
        return super().structured_outputs_params()

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- text completions -------------------------------------------------------------------
class CompletionRequest(_SamplingRequest):
    prompt: (
        NonEmptyStr
        | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
    ) = Field(..., description="a string, a list of one string, or a list of token ids")
    max_tokens: Int(ge=1) | None = 16
    logprobs: Int(ge=0, le=SamplingParams.MAX_LOGPROBS) | None = None
    echo: bool = Field(False, description="the prompt's text before the completion's")

    @model_validator(mode="after")
    def _echo_without_logprobs(self) -> "CompletionRequest":
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs (the prompt's logprobs) is not supported")
        return self

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_input(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return self.prompt  # type: ignore[return-value]


# ---- responses --------------------------------------------------------------------------
def _now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens served by the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprob] | None
    refusal: list[ChatLogprob] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """One call's piece: index, id, type and name first, then argument fragments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None


class CompletionStreamResponse(CompletionResponse):
    """One chunk of a completion stream: `usage` only in the last, with include_usage."""

    usage: UsageInfo | None = None


# ---- models, tokenizer, errors ----------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "ember"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletionRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(_Request):
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo

