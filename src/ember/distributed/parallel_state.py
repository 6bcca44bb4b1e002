"""Tensor-parallel process groups: launch, backend choice, refusals, liveness.

Two ways to start N ranks:
- spawned (the default): rank 0 is the engine's own process (scheduler, sampler, server);
  it starts ranks 1..N-1 as local processes, `python -m ember.distributed.worker` (a fresh
  interpreter: unlike multiprocessing's spawn, it never re-imports the user's `__main__`).
- launched: `torchrun`, or anything that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT,
  starts every rank, on one host or several; rank 0 runs the engine, the others the worker loop.

Every rank joins two groups. The default group (`distributed_backend`: gloo on CPU, nccl on
CUDA) carries the model's collectives. A gloo group, `control`, carries the step description
rank 0 broadcasts before each forward pass: host objects, with a timeout long enough for a
server that idles for days.

Rank 0 watches the other ranks: the exit of spawned workers, and store heartbeats of
launched ones. A death is reported to the `on_failure` callbacks within a second or two
(`HEARTBEAT_TIMEOUT_S` for a launched rank).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ember.config import EngineConfig, resolve_device
from ember.errors import ConfigError

logger = logging.getLogger("ember")

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = 10.0
_IDLE_TIMEOUT = timedelta(days=365)  # the control group: workers wait there while idle
_KNOWN_BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")


def launcher_env() -> dict[str, int] | None:
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE as set by torchrun, if they are."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return {
        "rank": int(os.environ["RANK"]),
        "world_size": world,
        "local_rank": int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", world)),
    }


@dataclass(frozen=True)
class ParallelPlan:
    """Where one rank runs and how it talks to the others; checked before anything loads."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int  # ranks on this host: they share its CPU cores
    backend: str
    device: torch.device
    launched: bool  # every rank was started by a launcher (torchrun), none is spawned

    @property
    def is_worker(self) -> bool:
        return self.rank > 0


def parallel_plan(config: EngineConfig, spawned_rank: int | None = None) -> ParallelPlan | None:
    """This process's plan (None without tensor parallelism), or a clear ConfigError.

    `spawned_rank` is given in a worker that rank 0 spawned; otherwise a launcher's
    environment decides (rank 0 when there is none).
    """
    world = config.tensor_parallel_size
    env = None if spawned_rank is not None else launcher_env()
    if env is not None and env["world_size"] > 1 and env["world_size"] != world:
        raise ConfigError(
            f"the launcher started WORLD_SIZE={env['world_size']} processes but "
            f"tensor_parallel_size={world}; pass --tensor-parallel-size {env['world_size']}"
        )
    if world == 1:
        return None
    if not dist.is_available():
        raise ConfigError("tensor parallelism needs torch.distributed, which this PyTorch "
                          "build lacks")
    if env is not None:
        rank, local_rank, local_world = env["rank"], env["local_rank"], env["local_world_size"]
    else:
        rank = local_rank = spawned_rank or 0
        local_world = world

    device = resolve_device(config.device)
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"device={config.device!r}: with tensor_parallel_size > 1 each rank uses its "
                f"own GPU (cuda:LOCAL_RANK); pass --device cuda (and CUDA_VISIBLE_DEVICES)")
        visible = torch.cuda.device_count()
        if visible < local_world:
            raise ConfigError(
                f"tensor_parallel_size={world} needs {local_world} CUDA devices on this host, "
                f"one per rank, but {visible} {'is' if visible == 1 else 'are'} visible")
        device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ConfigError(f"tensor parallelism runs on cpu or cuda, not {device.type}")
    backend = config.distributed_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_backend_available(backend):
        available = [b for b in _KNOWN_BACKENDS if dist.is_backend_available(b)]
        raise ConfigError(
            f"distributed_backend={backend!r} is not available in this PyTorch build "
            f"(available: {', '.join(available) or 'none'})")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("distributed_backend='nccl' needs CUDA devices; use gloo on CPU")
    return ParallelPlan(rank, world, local_rank, local_world, backend, device,
                        launched=env is not None)


@dataclass
class TensorParallelGroup:
    """This process's membership of the tensor-parallel group (see the module docstring)."""

    plan: ParallelPlan
    store: dist.Store
    control: Any  # the gloo ProcessGroup of the step broadcasts
    procs: list[subprocess.Popen] = field(default_factory=list)  # spawned workers (rank 0)
    broken: bool = False  # a step stopped half-way: the ranks' collectives are out of step
    _failure: str | None = None
    _failed: threading.Event = field(default_factory=threading.Event)
    _callbacks: list[Callable[[str], None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads_before: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def rank(self) -> int:
        return self.plan.rank

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    @property
    def device(self) -> torch.device:
        return self.plan.device

    # ---- setup ------------------------------------------------------------------------------
    @classmethod
    def start(cls, plan: ParallelPlan, config: EngineConfig) -> "TensorParallelGroup":
        """Rank 0 (or a launched rank): spawn the workers if nobody launched them, then join."""
        procs: list = []
        if plan.launched:
            store = None  # init_process_group reads MASTER_ADDR / MASTER_PORT
        else:
            store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False,
                                  timeout=timedelta(seconds=60))
            procs = _spawn_workers(config, plan.world_size, store)
            try:
                _wait_for_workers(store, procs)
            except BaseException:
                _terminate(procs)
                raise
        try:
            group = cls._join(plan, store, procs)
        except BaseException:
            _terminate(procs)
            raise
        if plan.rank == 0:
            threading.Thread(target=group._watch, name="ember-tp-watchdog", daemon=True).start()
        else:
            threading.Thread(target=group._heartbeat, name="ember-tp-heartbeat",
                             daemon=True).start()
        return group

    @classmethod
    def join_spawned(cls, plan: ParallelPlan, store_port: int) -> "TensorParallelGroup":
        """A spawned worker: join rank 0's store, then the groups."""
        store = dist.TCPStore("127.0.0.1", store_port, None, is_master=False,
                              timeout=timedelta(seconds=60))
        store.set(f"ember/up/{plan.rank}", "1")
        group = cls._join(plan, store, [])
        threading.Thread(target=group._heartbeat, name="ember-tp-heartbeat", daemon=True).start()
        return group

    @classmethod
    def _join(cls, plan: ParallelPlan, store: dist.Store | None, procs: list
              ) -> "TensorParallelGroup":
        if plan.device.type == "cuda":
            torch.cuda.set_device(plan.device)
        kwargs: dict[str, Any] = {"init_method": "env://"} if store is None else {"store": store}
        dist.init_process_group(plan.backend, rank=plan.rank, world_size=plan.world_size,
                                timeout=timedelta(minutes=10), **kwargs)
        if store is None:
            store = dist.distributed_c10d._get_default_store()
        control = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
        group = cls(plan, store, control, procs)
        if plan.device.type == "cpu":  # ranks on one host share its cores
            group._threads_before = torch.get_num_threads()
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
                os.cpu_count() or 1)
            torch.set_num_threads(max(1, cores // plan.local_world_size))
        logger.info(
            "tensor parallel: rank %d of %d on %s, backend %s (%s, %d threads)", plan.rank,
            plan.world_size, plan.device, plan.backend,
            "launched" if plan.launched else "spawned" if plan.rank else "spawning",
            torch.get_num_threads())
        return group

    # ---- collectives of the engine loop ----------------------------------------------------
    def broadcast_step(self, step: Any) -> None:
        """Rank 0: send the next step's batch (None: stop) to every other rank."""
        dist.broadcast_object_list([step], src=0, group=self.control)

    def recv_step(self) -> Any:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t)

    # ---- failure ------------------------------------------------------------------------------
    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` (from the watchdog thread) when another rank dies; at once
        if one already has."""
        with self._lock:
            self._callbacks.append(callback)
            failure = self._failure
        if failure is not None:
            callback(failure)

    def failure(self, wait_s: float = 0.0) -> str | None:
        """Why the group is broken, if it is (waiting up to `wait_s` for the watchdog)."""
        self._failed.wait(wait_s)
        return self._failure

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._failure is not None or self._stop.is_set():
                return
            self._failure = reason
            callbacks = list(self._callbacks)
        self._failed.set()
        logger.error("tensor parallel: %s", reason)
        for callback in callbacks:
            callback(reason)

    def _watch(self) -> None:
        """Rank 0: spawned workers' exits; launched ranks' heartbeats."""
        seen = {} if self.procs else {r: (-1, time.monotonic()) for r in range(1, self.world_size)}
        while not self._stop.wait(0.25):
            for rank, proc in enumerate(self.procs, start=1):
                if proc.poll() is not None:
                    self._fail(f"worker rank {rank} (pid {proc.pid}) exited with code "
                               f"{proc.returncode}")
            for rank, (count, since) in seen.items():
                try:
                    now_count = self.store.add(f"ember/heartbeat/{rank}", 0)
                except Exception as e:  # the store itself is gone
                    self._fail(f"the rendezvous store failed ({e})")
                    return
                now = time.monotonic()
                if now_count != count:
                    seen[rank] = (now_count, now)
                elif now - since > HEARTBEAT_TIMEOUT_S:
                    self._fail(f"rank {rank} sent no heartbeat for {now - since:.0f} s")

    def _heartbeat(self) -> None:
        """Ranks > 0: prove liveness to rank 0; exit if rank 0's store is gone."""
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                self.store.add(f"ember/heartbeat/{self.rank}", 1)
            except Exception:
                if self._stop.is_set():
                    return
                logger.error("tensor parallel rank %d: lost rank 0; exiting", self.rank)
                os._exit(1)

    # ---- shutdown ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Rank 0: stop the workers and leave the group. In order (a None step, which they
        wait for between steps) unless a rank failed or a step broke; else terminate them."""
        if self._stop.is_set():
            return
        healthy = not self.broken and self._failure is None
        self._stop.set()
        if self.rank == 0 and healthy:
            try:
                self.broadcast_step(None)
            except Exception:  # a worker died meanwhile: terminate below
                healthy = False
        _terminate(self.procs, grace_s=10 if healthy else 0)
        self.close()

    def close(self) -> None:
        """Leave the process group (every rank, last)."""
        self._stop.set()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None


def _spawn_workers(config: EngineConfig, world: int, store: dist.TCPStore
                   ) -> list[subprocess.Popen]:
    level = logging.getLogger("ember").getEffectiveLevel()
    procs = []
    for rank in range(1, world):
        cmd = [sys.executable, "-m", "ember.distributed.worker", "--rank", str(rank),
               "--store-port", str(store.port), "--log-level", str(level),
               "--config", json.dumps(dataclasses.asdict(config))]
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        logger.info("tensor parallel: spawned worker rank %d (pid %d)", rank, p.pid)
        procs.append(p)
    return procs


def _wait_for_workers(store: dist.TCPStore, procs: list, timeout_s: float = 300.0) -> None:
    """Until every spawned worker is up (imports done, about to join); refuse a dead one."""
    keys = [f"ember/up/{rank}" for rank in range(1, len(procs) + 1)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        for rank, p in enumerate(procs, start=1):
            if p.poll() is not None:
                raise RuntimeError(f"tensor-parallel worker rank {rank} (pid {p.pid}) exited "
                                   f"with code {p.returncode} while starting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"tensor-parallel workers did not start within {timeout_s:.0f} s")
        time.sleep(0.05)


def _terminate(procs: list[subprocess.Popen], grace_s: float = 0.0) -> None:
    """Wait up to `grace_s` for the workers to exit, then SIGTERM, then SIGKILL."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
