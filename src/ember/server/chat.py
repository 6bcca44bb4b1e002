"""A chat request's conversation as the model's prompt text: its tools planned (tools.py) and
rendered with the messages through the tokenizer's chat template. CPU work: call
`render_chat` off the event loop."""

from __future__ import annotations

from ember.engine.async_engine import AsyncLLMEngine
from ember.server import tools
from ember.server.protocol import ChatCompletionRequest, NamedToolChoice, TokenizeChatRequest
from ember.server.tools import ToolPlan


def plan_tools(engine: AsyncLLMEngine, req: ChatCompletionRequest) -> ToolPlan | None:
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        choice = choice.model_dump()
    return tools.plan_tools(
        tools.detect_format(engine.tokenizer.chat_template),
        [t.model_dump(exclude_none=True) for t in req.tools or ()], choice,
        bool(req.parallel_tool_calls))


def render_chat(engine: AsyncLLMEngine, req: ChatCompletionRequest | TokenizeChatRequest,
                plan: ToolPlan | None = None) -> str:
    """The conversation as the prompt text, its tools rendered; refused (InvalidRequestError)
    when the text alone is too long for the context."""
    tok = engine.tokenizer
    fmt = tools.detect_format(tok.chat_template)
    tool_defs = [t.model_dump(exclude_none=True) for t in getattr(req, "tools", None) or ()]
    parallel = plan.parallel if plan is not None else True
    messages = tools.render_messages([m.to_template_dict() for m in req.messages], fmt,
                                     tool_defs or None, parallel)
    text = tok.apply_chat_template(messages, req.add_generation_prompt,
                                   tools=tool_defs if fmt != "generic" else None)
    engine.input_processor.check_text(text, "messages")
    return text
