"""`LLM`: the offline API, in vLLM's shape.

    from ember import LLM, SamplingParams
    llm = LLM()  # the default model
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from tqdm.auto import tqdm

from ember.config import EngineConfig
from ember.engine.llm_engine import LLMEngine
from ember.errors import InvalidRequestError
from ember.outputs import RequestOutput, merge_outputs
from ember.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        config = EngineConfig.from_kwargs(
            model=model, dtype=dtype, max_model_len=max_model_len, seed=seed, **kwargs
        )
        self.llm_engine = LLMEngine(config)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt, batched by the engine; outputs in the prompts' order.

        A prompt is a string, a list of token ids, or {"prompt_token_ids": [...]}.
        """
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InvalidRequestError(
                    f"got {len(params)} sampling_params for {len(prompts)} prompts"
                )
        engine = self.llm_engine
        ids = []
        for prompt, p in zip(prompts, params):
            if isinstance(prompt, dict):
                prompt = prompt["prompt_token_ids"]
            rid = str(next(self._counter))
            engine.add_request(rid, prompt, p)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.llm_engine.tokenizer
        prompts = [
            tok.encode(tok.apply_chat_template(conv, add_generation_prompt),
                       add_special_tokens=False)
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Step until every request is done; each request's deltas are merged once, at its end."""
        engine = self.llm_engine
        deltas: dict[str, list[RequestOutput]] = {rid: [] for rid in request_ids}
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    deltas[out.request_id].append(out)
                    if out.finished:
                        finished[out.request_id] = merge_outputs(deltas.pop(out.request_id))
                        bar.update(1)
        except BaseException:
            for rid in request_ids:  # leave no half-done request behind (KeyboardInterrupt)
                engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [finished[rid] for rid in request_ids]
