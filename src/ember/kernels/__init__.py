"""ember's own CPU kernels, where PyTorch's generic ops leave speed on the table.

One C++ source per kernel family (attention.cpp, cache.cpp, matmul.cpp, int4.cpp, kquant.cpp,
sampling.cpp, decode.cpp; common.h their shared helpers), linked into one library. Each op's
Python call and its fake (for torch.compile) live in `ember.kernels.ops`.

They are compiled once per machine, for its own instruction set (like llama.cpp's native
build), by the system C++ compiler against the installed torch, and cached under
~/.cache/ember/kernels/<hash of source, torch, compiler flags, CPU> (`make install` builds them
ahead: `python -m ember.kernels`). They register as `torch.ops.ember_cpu.*`. Without a
compiler, or if the build fails, ember runs PyTorch's ops instead, with a warning: the kernels
make it faster, never able to run.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from ember.cpuinfo import cpu_flags, cpu_model
from ember.kernels import ops

logger = logging.getLogger("ember")

_HERE = Path(__file__).parent
# Every source and header of the folder: each one is compiled (or included) and hashed into
# the cache key, so a new file cannot be left out of either.
SOURCES = sorted(_HERE.glob("*.cpp"))
HEADERS = sorted(_HERE.glob("*.h"))
# -march=native: this machine's vector units (AVX-512, its bf16 and VNNI extensions, ...); the
# kernels issue no AMX. Reassociation (vectorized reductions) but not -ffast-math, which,
# linked into a shared library, sets flush-to-zero for the whole process (crtfastmath).
# OpenMP: at::parallel_for's threads (torch's own libgomp at run time).
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
         "-fassociative-math", "-freciprocal-math", "-fopenmp", "-std=c++20", "-shared", "-fPIC",
         "-w"]
DISABLE_ENV = "EMBER_DISABLE_CPU_KERNELS"  # =1: PyTorch's ops only (for A/B comparisons)

_loaded = False  # set by `load`


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cache_path(cxx: str) -> Path:
    # The CPU too: -march=native code built on one CPU can crash on another sharing the folder.
    key = hashlib.sha256()
    for part in (*(p.name.encode() + p.read_bytes() for p in SOURCES + HEADERS),
                 torch.__version__.encode(),
                 " ".join(FLAGS).encode(), cxx.encode(), cpu_model().encode(),
                 cpu_flags().encode()):
        key.update(part)
    root = Path(os.environ.get("EMBER_KERNELS_CACHE", Path.home() / ".cache" / "ember" / "kernels"))
    return root / key.hexdigest()[:16] / "ember_cpu.so"


def _build(cxx: str, target: Path) -> None:
    """Compile the sources to object files, a core each, then link them."""
    torch_dir = Path(torch.__file__).parent
    compile_flags = [f for f in FLAGS if f != "-shared"]
    include = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include/torch/csrc/api/include'}"]
    objects = [target.with_name(f"{src.stem}.o") for src in SOURCES]

    def compile_one(src: Path, obj: Path) -> None:
        subprocess.run([cxx, *compile_flags, *include, "-c", str(src), "-o", str(obj)],
                       check=True, capture_output=True, text=True)

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(compile_one, SOURCES, objects))  # list(): raises the first failure
    subprocess.run([cxx, *FLAGS, *map(str, objects), "-o", str(target) + ".tmp",
                    f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10",
                    f"-Wl,-rpath,{torch_dir / 'lib'}"], check=True, capture_output=True, text=True)
    for obj in objects:
        obj.unlink()
    os.replace(str(target) + ".tmp", target)  # atomic: a reader never sees half a library


@functools.cache
def load() -> bool:
    """Build (once per machine) and load the CPU kernels; whether `torch.ops.ember_cpu` is
    there to use."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        logger.info("CPU kernels off (%s): PyTorch's ops only", DISABLE_ENV)
        return False
    cxx = _compiler()
    if cxx is None:
        logger.warning("no C++ compiler found: ember's CPU kernels are off (slower attention)")
        return False
    target = _cache_path(cxx)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # One build at a time (parallel tests, several ranks): the others wait, then load it.
        with open(target.parent / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                logger.info("building ember's CPU kernels for this machine (once, ~20 s)")
                start = time.perf_counter()
                _build(cxx, target)
                logger.info("built the CPU kernels in %.1f s: %s", time.perf_counter() - start,
                            target)
        torch.ops.load_library(str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        logger.warning("ember's CPU kernels are off: their build failed (%s)",
                       detail.strip().splitlines()[-1] if detail.strip() else type(e).__name__)
        return False
    ops.register_fakes()
    global _loaded
    _loaded = True
    return True


def available(device: torch.device) -> bool:
    """Whether ember's kernels serve tensors on `device` (CPU, once `load`ed)."""
    return _loaded and device.type == "cpu"


def int4_tiles(device: torch.device) -> bool:
    """Whether int4 layers on `device` can use ember's own layout and GEMV (`int4_tiled_linear`:
    built where the CPU has AVX512-BF16)."""
    return available(device) and _tiles_supported()


@functools.cache
def _tiles_supported() -> bool:
    return ops.int4_tiles_supported()
