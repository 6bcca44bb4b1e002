"""`python -m fault_injection serve ...`: `ember serve` with two faults planted in the engine,
each set off by a prompt that starts with its marker token ids (tests/test_server_faults.py).

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
    check_stop = LLMEngine._check_stop
    execute = ModelRunner.execute

    def faulty_check_stop(self, req, detok):
        if _marked(req, REQUEST_FAULT):
            raise RuntimeError("injected fault in one request")
        return check_stop(self, req, detok)

    def faulty_execute(self, sched):
        if any(_marked(r, STEP_FAULT) for r in sched.requests):
            raise RuntimeError("injected fault: device lost")
        return execute(self, sched)

    LLMEngine._check_stop = faulty_check_stop
    ModelRunner.execute = faulty_execute


if __name__ == "__main__":
    _plant()
    sys.exit(main(sys.argv[1:]))
