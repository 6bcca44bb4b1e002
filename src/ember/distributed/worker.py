"""Tensor-parallel ranks 1..N-1: load this rank's shard, then run the model on every step
rank 0 broadcasts, until it broadcasts None.

A worker has no scheduler, tokenizer loop or sampler: it builds the same `ModelRunner` as
rank 0 (same KV-cache size, its own KV heads) and calls `ModelRunner.forward`, which joins the
model's collectives and sends its logits slice to rank 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable

from ember.config import EngineConfig
from ember.distributed.parallel_state import ParallelPlan, TensorParallelGroup, parallel_plan

logger = logging.getLogger("ember")


def serve_steps(join: Callable[[], TensorParallelGroup], config: EngineConfig, rank: int) -> int:
    """Join the group, load the shard and follow rank 0's steps; the exit code. A failure
    (rank 0 gone, most often) is one line of log: rank 0 reports the story."""
    try:
        _serve_steps(join(), config)
    except Exception as e:
        logger.error("tensor parallel rank %d stopped: %s", rank, str(e).splitlines()[0])
        return 1
    return 0


def _serve_steps(group: TensorParallelGroup, config: EngineConfig) -> None:
    from ember.engine.model_runner import load_runner
    from ember.loading.loader import open_model, resolve_precision

    try:
        dtype, quant = resolve_precision(config, group.device, group.world_size)
        ckpt, max_model_len = open_model(config.model, dtype, config.max_model_len, quant)
        runner = load_runner(config, ckpt, max_model_len, group.device, dtype, group, quant)
        logger.info("tensor parallel rank %d: ready", group.rank)
        while (step := group.recv_step()) is not None:
            runner.forward(step)
        logger.info("tensor parallel rank %d: stopped by rank 0", group.rank)
    finally:
        group.close()


def run_spawned_worker(argv: list[str]) -> int:
    """`python -m ember.distributed.worker --rank R --store-port P --config JSON`: a worker
    that rank 0 started on this host."""
    ap = argparse.ArgumentParser(prog="ember.distributed.worker")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--store-port", type=int, required=True)
    ap.add_argument("--log-level", type=int, default=logging.INFO)
    ap.add_argument("--config", required=True, help="the EngineConfig, as JSON")
    args = ap.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group: rank 0 decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(levelname)s %(name)s[rank {args.rank}]: %(message)s")
    config = EngineConfig(**json.loads(args.config))
    plan = parallel_plan(config, spawned_rank=args.rank)
    assert plan is not None
    return serve_steps(lambda: TensorParallelGroup.join_spawned(plan, args.store_port), config,
                       args.rank)


def run_launched_worker(plan: ParallelPlan, config: EngineConfig) -> int:
    """A rank > 0 that torchrun started: join, serve rank 0's steps; the exit code."""
    return serve_steps(lambda: TensorParallelGroup.start(plan, config), config, plan.rank)


if __name__ == "__main__":
    sys.exit(run_spawned_worker(sys.argv[1:]))
