"""Tool calling: how the tools reach the prompt, the grammar that keeps calls valid, and the
parsers that turn the generated text back into OpenAI `tool_calls`.

The call format follows the model's chat template:

- `hermes` (Qwen 2.5/3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
- `llama3_json` (Llama 3.1-3.3): `{"name": ..., "parameters": {...}}`, calls joined by `; `;
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;
- `generic`, for templates that know no tools (the default model's), as llama.cpp's generic
  handler: the tool definitions go into the system message, and a call is the whole answer,
  one JSON object `{"tool_calls": [{"name": ..., "arguments": {...}}]}`.

The template is rendered with `tools=` for the first three. Decoding is constrained by an
llguidance Lark grammar built from the tools' parameter schemas: with `tool_choice`
"required" or a named function the answer must be calls; with "auto" it is free text until
the format's trigger (`<tool_call>`, `[TOOL_CALLS]`, a leading `{`), after which the call must
be valid. The arguments of a call are the exact JSON text the model generated (compact, as
the grammar has it), the same whether streamed or not.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from ember.errors import InvalidRequestError
from ember.structured_output.schema import closed_schema

ToolFormat = Literal["hermes", "llama3_json", "mistral", "generic"]


# ---- format detection and prompts -----------------------------------------------------------
def detect_format(chat_template: str | None) -> ToolFormat:
    """The call format a chat template was trained with; `generic` if it renders no tools."""
    template = chat_template or ""
    if "tools" not in template:
        return "generic"
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "generic"


def generic_system_prompt(tools: list[dict[str, Any]], parallel: bool) -> str:
    """The generic format's instructions (llama.cpp's generic handler says much the same)."""
    listing = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    many = ("one or more tools" if parallel else "a tool")
    return (
        f"You can call these tools:\n{listing}\n"
        f"To call {many}, answer with only a JSON object of this form: "
        '{"tool_calls": [{"name": "<tool name>", "arguments": {<the tool\'s arguments>}}]}\n'
        "Otherwise answer the user in plain text.")


def render_messages(messages: list[dict[str, Any]], fmt: ToolFormat,
                    tools: list[dict[str, Any]] | None, parallel: bool) -> list[dict[str, Any]]:
    """Messages for the chat template. Templates with tools get the assistant's calls (the
    arguments as objects, as HF templates expect) and `tool` messages as they are. The
    generic format writes calls as the JSON the model would generate, tool results as user
    messages holding `{"tool_response": ...}`, and the tool list into the system message."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if fmt != "generic":
            if calls:
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments":
                                   _loads_or_str(c["function"]["arguments"])}} for c in calls]
            out.append(m)
            continue
        if calls:
            body = [{"name": c["function"]["name"],
                     "arguments": _loads_or_str(c["function"]["arguments"])} for c in calls]
            text = json.dumps({"tool_calls": body}, ensure_ascii=False, separators=(",", ":"))
            m["content"] = ((m.get("content") or "") + ("\n" if m.get("content") else "")
                            + text)
        elif m["role"] == "tool":
            response = {"tool_call_id": m.pop("tool_call_id", None), "content": m["content"]}
            m = {"role": "user", "content": json.dumps({"tool_response": response},
                                                       ensure_ascii=False)}
        m.pop("tool_call_id", None)
        out.append(m)
    if fmt == "generic" and tools:
        prompt = generic_system_prompt(tools, parallel)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "role": "system",
                      "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _loads_or_str(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


# ---- grammars -------------------------------------------------------------------------------
# With parallel_tool_calls, an answer holds at most this many calls: an unbounded list lets a
# model that repeats itself call on until max_tokens, and the answer never ends as calls.
MAX_PARALLEL_CALLS = 8


def _call_schema(tool: dict[str, Any], args_key: str) -> dict[str, Any]:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False}


def _one_of(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _json(schema: dict[str, Any]) -> str:
    options = {"x-guidance": {"whitespace_flexible": False, "coerce_one_of": True}}
    return "%json " + json.dumps({**closed_schema(schema), **options})


def tool_grammar(fmt: ToolFormat, tools: list[dict[str, Any]], required: bool,
                 parallel: bool) -> str:
    """The Lark grammar (llguidance's dialect) for the answer: calls only (`required`), or
    free text that, once a call starts, must be a valid call."""
    if fmt == "generic":
        calls = {"type": "array", "items": _one_of([_call_schema(t, "arguments") for t in tools]),
                 "minItems": 1, "maxItems": MAX_PARALLEL_CALLS if parallel else 1}
        body = _json({"type": "object", "properties": {"tool_calls": calls},
                      "required": ["tool_calls"], "additionalProperties": False})
        # Text must not start with "{": a leading brace is the start of a call.
        return f"start: calls\ncalls: {body}\n" if required else \
            f"start: TEXT | calls\nTEXT: /[^{{\\s](.|\\n)*/\ncalls: {body}\n"
    if fmt == "mistral":
        items = _one_of([_call_schema(t, "arguments") for t in tools])
        array = {"type": "array", "items": items, "minItems": 1,
                 "maxItems": MAX_PARALLEL_CALLS if parallel else 1}
        trigger, calls = '"[TOOL_CALLS]"', f"calls: {_json(array)}"
        rule = "start: trigger calls"
    else:
        args_key = "parameters" if fmt == "llama3_json" else "arguments"
        one = _json(_one_of([_call_schema(t, args_key) for t in tools]))
        if fmt == "hermes":
            trigger = '"<tool_call>"'
            call = f'call: "\\n" {one} "\\n</tool_call>"'
            sep = '"\\n" trigger'
        else:
            trigger = '"{"'  # llama3_json: a call is a bare object, text never starts with "{"
            call = f"call: {one}"
            sep = '"; "'
        more = f"({sep} call){{0,{MAX_PARALLEL_CALLS - 1}}}" if parallel else ""
        calls = f"{call}\ncalls: call {more}"
        rule = "start: trigger calls" if fmt == "hermes" else "start: calls"
    if required:
        return f"{rule}\ntrigger: {trigger}\n{calls}\n"
    if fmt == "llama3_json":
        return f"start: TEXT | calls\nTEXT: /[^{{\\s](.|\\n)*/\n{calls}\n"
    # Free text that does not contain the trigger, then optionally the calls.
    lit = json.loads(trigger)
    return (f"start: TEXT (trigger calls)?\ntrigger: {trigger}\n"
            f"TEXT: /(?s:.*)/ & ~/(?s:.*){re.escape(lit)}(?s:.*)/\n{calls}\n")


# ---- parsing --------------------------------------------------------------------------------
@dataclass
class ParsedCall:
    name: str | None  # None until the name is complete
    arguments: str  # the raw JSON text of the arguments so far
    complete: bool  # the arguments' JSON value is closed


@dataclass
class ParsedOutput:
    content: str  # text outside the calls (what may be streamed as content)
    calls: list[ParsedCall] = field(default_factory=list)
    in_call: bool = False  # the text has entered the call syntax (content is final)


_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def _value_end(text: str, start: int) -> int | None:
    """The end of the JSON value starting at `start` (an object, array, string or scalar), or
    None if the text ends first."""
    depth, in_str, esc = 0, False, False
    i = start
    while i < len(text):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                if depth == 0:
                    return i + 1
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        elif depth == 0 and ch in ",}] \n":
            return i
        i += 1
    return None


def _calls_in(text: str, starts: list[int]) -> list[ParsedCall]:
    """The call objects that begin at each of `starts` (each a "{")."""
    calls = []
    for k, start in enumerate(starts):
        end = _value_end(text, start)
        chunk = text[start:end] if end is not None else text[start:]
        name = _NAME.search(chunk)
        args = _ARGS.search(chunk)
        arguments, complete = "", False
        if args is not None:
            a0 = args.end()
            a1 = _value_end(chunk, a0) if a0 < len(chunk) else None
            arguments = chunk[a0:a1] if a1 is not None else chunk[a0:]
            complete = a1 is not None and (end is not None or k < len(starts) - 1)
        calls.append(ParsedCall(json.loads(f'"{name.group(1)}"') if name else None,
                                arguments, complete))
    return calls


def _object_starts(text: str, start: int, stop: int | None = None) -> list[int]:
    """Starts of the top-level objects of the JSON array (or object run) from `start`."""
    out, i = [], start
    stop = len(text) if stop is None else stop
    while i < stop:
        if text[i] == "{":
            out.append(i)
            end = _value_end(text, i)
            if end is None:
                break
            i = end
        else:
            i += 1
    return out


_TRIGGERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}


def parse_output(fmt: ToolFormat, text: str) -> ParsedOutput:
    """Content and calls in `text`, which may be a prefix of the final output (streaming)."""
    if fmt in ("generic", "llama3_json"):
        stripped = text.lstrip()
        if not stripped.startswith("{"):
            return ParsedOutput(content=text)
        first = len(text) - len(stripped)
        if fmt == "generic":
            key = re.search(r'"tool_calls"\s*:\s*\[', text)
            starts = _object_starts(text, key.end()) if key else []
        else:
            starts = _object_starts(text, first)
        return ParsedOutput(content="", calls=_calls_in(text, starts), in_call=True)
    trigger = _TRIGGERS[fmt]
    at = text.find(trigger)
    if at < 0:
        # Hold back a tail that may be the trigger's beginning.
        keep = next((k for k in range(min(len(trigger) - 1, len(text)), 0, -1)
                     if trigger.startswith(text[-k:])), 0)
        return ParsedOutput(content=text[:len(text) - keep])
    starts = _object_starts(text, at + len(trigger))
    return ParsedOutput(content=text[:at], calls=_calls_in(text, starts), in_call=True)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---- the request's tool settings ------------------------------------------------------------
@dataclass
class ToolPlan:
    """What one chat request does with its tools."""

    fmt: ToolFormat
    tools: list[dict[str, Any]]
    grammar: str | None  # None: tool_choice "none"
    parallel: bool

    @property
    def parses_calls(self) -> bool:
        return self.grammar is not None


def plan_tools(fmt: ToolFormat, tools: list[dict[str, Any]] | None, tool_choice: Any,
               parallel: bool) -> ToolPlan | None:
    """None without tools; raises InvalidRequestError for a choice naming no given tool."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice needs tools")
        return None
    choice = tool_choice if tool_choice is not None else "auto"
    if choice == "none":
        return ToolPlan(fmt, tools, None, parallel)
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools: function names must be unique")
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise InvalidRequestError(f"tool_choice names function {name!r}, which is not in tools")
        return ToolPlan(fmt, tools, tool_grammar(fmt, chosen, True, False), False)
    return ToolPlan(fmt, tools, tool_grammar(fmt, tools, choice == "required", parallel),
                    parallel)
