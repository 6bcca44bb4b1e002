"""`python -m fault_injection serve ...`: `ember serve` with two faults planted in the engine,
each set off by a prompt that starts with its marker token ids (tests/server/test_server_faults.py).

- REQUEST_FAULT: processing that request's sampled token raises (a bug of that request alone).
- STEP_FAULT: the model step of any batch holding that request raises (a lost device, say).
"""

from __future__ import annotations

import sys

from ember.cli import main
from ember.engine.llm_engine import LLMEngine
from ember.engine.model_runner import ModelRunner

REQUEST_FAULT = [7777, 7777, 7777]
STEP_FAULT = [8888, 8888, 8888]


def _marked(req, marker: list[int]) -> bool:
    return list(req.prompt_token_ids[:len(marker)]) == marker


def _plant() -> None:
    completion_delta = LLMEngine._completion_delta
    execute = ModelRunner.execute

    def faulty_completion_delta(self, parent, index, core_output):
        if _marked(parent, REQUEST_FAULT):
            raise RuntimeError("injected fault in one request")
        return completion_delta(self, parent, index, core_output)

    def faulty_execute(self, sched):
        reqs = [*sched.scheduled_new_reqs,
                *(self.requests[c.req_id] for c in sched.scheduled_cached_reqs)]
        if any(_marked(r, STEP_FAULT) for r in reqs):
            raise RuntimeError("injected fault: device lost")
        return execute(self, sched)

    LLMEngine._completion_delta = faulty_completion_delta
    ModelRunner.execute = faulty_execute


if __name__ == "__main__":
    _plant()
    sys.exit(main(sys.argv[1:]))
