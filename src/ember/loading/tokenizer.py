"""The engine's tokenizer: a `tokenizers.Tokenizer` plus what HF keeps beside it.

Built either from an HF checkpoint (`tokenizer.json` + `tokenizer_config.json`) or from the
vocabulary stored in a GGUF file; both paths end in this one class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from ember.errors import InvalidRequestError, ModelLoadError


def _raise_exception(message: str) -> None:
    raise InvalidRequestError(f"chat template error: {message}")


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos_token: bool = False
    chat_template: str | None = None
    _template: Any = field(default=None, repr=False)
    _max_token_chars: int | None = field(default=None, repr=False)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: Path, generation_eos: list[int] | None = None) -> "Tokenizer":
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(f"{path}: no tokenizer.json (an HF checkpoint needs one)")
        backend = HFTokenizer.from_file(str(tok_file))
        cfg: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())

        def token_id(entry: Any) -> int | None:
            if isinstance(entry, dict):
                entry = entry.get("content")
            return backend.token_to_id(entry) if entry else None

        eos: list[int] = list(generation_eos or [])
        cfg_eos = token_id(cfg.get("eos_token"))
        if cfg_eos is not None and cfg_eos not in eos:
            eos.append(cfg_eos)
        template = cfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return cls(
            backend=backend,
            bos_token_id=token_id(cfg.get("bos_token")),
            eos_token_ids=tuple(eos),
            add_bos_token=bool(cfg.get("add_bos_token", False)),
            chat_template=template,
        )

    # ---- encode / decode ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def max_token_chars(self) -> int:
        """The most characters of text one token stands for, plus one (for a leading space
        that a decoder drops from a token alone): a text longer than n times this cannot be
        fewer than n tokens, so it can be refused without tokenizing it. (Computed once.)"""
        if self._max_token_chars is None:
            texts = self.backend.decode_batch([[i] for i in range(self.vocab_size)],
                                              skip_special_tokens=False)
            self._max_token_chars = max(map(len, texts), default=0) + 1
        return self._max_token_chars

    def token_text(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---- chat ---------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """`tools`: OpenAI tool definitions, for templates that render them."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; use a plain prompt")
        if not messages:
            raise InvalidRequestError("messages must not be empty")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True
            )
            env.globals["raise_exception"] = _raise_exception
            self._template = env.from_string(self.chat_template)
        bos = self.token_text(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.token_text(self.eos_token_ids[0]) if self.eos_token_ids else ""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos or "",
                eos_token=eos or "",
                **({"tools": tools} if tools else {}),
            )
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"chat template failed: {e}") from e
