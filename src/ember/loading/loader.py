"""Find a model (default, local HF directory, GGUF file or hub id) and build it.

Every format ends in the same three things: a `ModelConfig`, an iterator of HF-named weight
tensors, and a `Tokenizer` (`open_model`); `load_model` turns them into a ready
`LlamaForCausalLM` (or, under tensor parallelism, this rank's shard of one).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from tqdm.auto import tqdm

from ember import kernels
from ember import memory
from ember.config import EngineConfig, ModelConfig
from ember.errors import ConfigError, ModelLoadError
from ember.loading.tokenizer import Tokenizer

if TYPE_CHECKING:
    from ember.distributed.parallel_state import TensorParallelGroup

logger = logging.getLogger("ember")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Checkpoint:
    """A model found on disk, before its weights are read."""

    path: Path
    format: str  # "gguf" | "hf"
    config: ModelConfig
    tokenizer: Tokenizer
    context_length: int
    weights: Iterator[tuple[str, torch.Tensor]]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 (or AMX, which implies it): bf16 matmuls run natively, not emulated."""
    return torch.cpu._is_avx512_bf16_supported()


def resolve_dtype(dtype: str, device: torch.device, quantized: bool) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cpu":
            return torch.bfloat16
        # fp32 is the exactness mode on CPU; the quantized kernels want bf16 activations.
        return torch.bfloat16 if quantized and cpu_has_native_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; supported: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def is_gguf(path: Path) -> bool:
    """A .gguf file, or a directory holding exactly one and no config.json."""
    if path.is_file():
        return path.suffix == ".gguf"
    return not (path / "config.json").is_file() and len(list(path.glob("*.gguf"))) == 1


def resolve_quantization(method: str, path: Path) -> str:
    """`auto`: a GGUF file keeps its quantized tensors ("gguf"); anything else runs dense."""
    if method == "auto":
        return "gguf" if is_gguf(path) else "none"
    return method


def resolve_model_path(model: str | None) -> Path:
    """A local path for `model`: the default GGUF, a local file/dir, a packaged model's name
    (`loading.packaged`), or a hub download."""
    if model is None:
        from ember.loading.gguf import default_gguf_path

        return default_gguf_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    from ember.loading.packaged import PACKAGED, packaged_model_path

    if model in PACKAGED:
        return packaged_model_path(model)
    if _HUB_ID.match(model) and not model.endswith(".gguf"):
        return _download_from_hub(model)
    raise ModelLoadError(f"model path not found: {model}")


def _download_from_hub(repo_id: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelLoadError(
            f"model {repo_id!r} is not a local path and HF_HUB_OFFLINE=1 forbids downloading it"
        )
    try:
        from huggingface_hub import snapshot_download

        logger.info("downloading %s from the Hugging Face hub", repo_id)
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"],
            )
        )
    except Exception as e:  # network, auth, or unknown repo: all user-facing
        raise ModelLoadError(
            f"model {repo_id!r} is not a local path and could not be fetched from the "
            f"Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def open_checkpoint(path: Path, dtype: torch.dtype, keep_quantized: bool = False) -> Checkpoint:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: not a GGUF file or an HF checkpoint directory")
        from ember.loading.gguf import load_gguf

        config, weights, tokenizer, ctx = load_gguf(path, dtype, keep_quantized)
        return Checkpoint(path, "gguf", config, tokenizer, ctx, weights)
    if is_gguf(path):
        return open_checkpoint(next(path.glob("*.gguf")), dtype, keep_quantized)
    return _open_hf_dir(path, dtype)


def _open_hf_dir(path: Path, dtype: torch.dtype) -> Checkpoint:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: no config.json (not an HF checkpoint directory)")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{cfg_file}: unreadable ({e})") from e
    config = ModelConfig.from_hf_config(hf_cfg)

    generation_eos: list[int] = []
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        generation_eos = [eos] if isinstance(eos, int) else list(eos or [])
    if not generation_eos and hf_cfg.get("eos_token_id") is not None:
        eos = hf_cfg["eos_token_id"]
        generation_eos = [eos] if isinstance(eos, int) else list(eos)
    tokenizer = Tokenizer.from_hf_dir(path, generation_eos)

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        shards = [path / f for f in files]
    else:
        shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{path}: no *.safetensors weights")
    for shard in shards:
        if not shard.is_file():
            raise ModelLoadError(f"{shard}: listed in the index but missing")
    ctx = config.max_position_embeddings
    return Checkpoint(path, "hf", config, tokenizer, ctx, _iter_safetensors(shards, dtype))


def _iter_safetensors(shards: list[Path], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(dtype)
        except SafetensorError as e:
            raise ModelLoadError(f"{shard}: unreadable or truncated safetensors ({e})") from e


def resolve_precision(config: EngineConfig, device: torch.device, world_size: int = 1
                      ) -> tuple[torch.dtype, str]:
    """(activation dtype, quantization: none | gguf | int8 | int4) for this model."""
    from ember.quantization import check_method

    check_method(config.quantization, config.int4_group_size)
    quant = resolve_quantization(config.quantization, resolve_model_path(config.model))
    if world_size > 1 and quant != "none":
        if config.quantization != "auto":
            raise ConfigError("quantization with tensor_parallel_size > 1 is not supported yet; "
                              "use --quantization none")
        quant = "none"  # a GGUF file is dequantized for its shards
    return resolve_dtype(config.dtype, device, quantized=quant != "none"), quant


def open_model(
    model: str | None, dtype: torch.dtype, max_model_len: int | None, quantization: str = "none"
) -> tuple[Checkpoint, int]:
    """Find the model and read its config and tokenizer (no weights yet); returns the
    checkpoint and the max model length. A GGUF file's Q4 tensors stay quantized for the
    `gguf` and `int4` modes (int4 already: no re-quantization)."""
    path = resolve_model_path(model)
    ckpt = open_checkpoint(path, dtype, keep_quantized=quantization in ("gguf", "int4"))
    if max_model_len is None:
        return ckpt, ckpt.context_length
    if max_model_len < 1 or max_model_len > ckpt.context_length:
        raise ConfigError(
            f"max_model_len={max_model_len} is outside [1, {ckpt.context_length}], "
            f"the model's context length"
        )
    return ckpt, max_model_len


def load_model(
    ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, max_model_len: int,
    tp: "TensorParallelGroup | None" = None, quantization: str = "none", group_size: int = 32,
) -> torch.nn.Module:
    """The model on `device` in eval mode, its weights read from `ckpt`; under tensor
    parallelism, this rank's shard of it. `int8` / `int4` quantize the dense weights."""
    from ember.distributed import tensor_parallel
    from ember.models import build_model
    from ember.quantization import quantize_model, use_column_tiles, weight_bytes

    rank, world = (tp.rank, tp.world_size) if tp is not None else (0, 1)
    tensor_parallel.check_shardable(ckpt.config, world)
    if device.type == "cpu" and kernels.load():  # before the weights: the head may use them
        logger.info("CPU kernels (ember.kernels): fused decode step, paged attention, "
                    "KV writes, Q8_0 head, int4 GEMV and many-row path")
    logger.info(
        "loading %s (%s, %s, %d layers, hidden %d) as %s on %s, quantization %s%s",
        ckpt.path, ckpt.format, ckpt.config.architecture, ckpt.config.num_hidden_layers,
        ckpt.config.hidden_size, str(dtype).removeprefix("torch."), device, quantization,
        f", shard {rank + 1} of {world}" if world > 1 else "",
    )
    with torch.device("meta"):
        net = build_model(tensor_parallel.shard_config(ckpt.config, world), max_model_len)
        if world > 1:
            tensor_parallel.parallelize(net, rank, world)
    net = net.to(dtype).to_empty(device=device)
    net.tie_weights()
    net.reset_buffers()  # rotary tables in float32 (positions need the precision)
    weights = ckpt.weights
    if world > 1:
        weights = tensor_parallel.shard_weights(weights, ckpt.config, rank, world)
    weights = tqdm(weights, desc="Loading weights", unit="tensor", leave=False,
                   disable=rank > 0 or not logger.isEnabledFor(logging.INFO))
    net.load_weights(weights)
    _log_kv_layout(ckpt.config)
    if quantization in ("int8", "int4"):
        n = quantize_model(net, quantization, group_size)
        logger.info("quantized %d linear layers to %s", n, quantization)
    if device.type == "cpu" and kernels.available(device):
        n = use_column_tiles(net)
        if n:
            logger.info("%d dense linear layers in column tiles (dense_linear: each row the "
                        "same whatever the number of rows)", n)
    logger.info("weights: %.1f MB", weight_bytes(net) / 1e6)
    if net.fuse_decode():
        logger.info("decode steps: token ids to final norm in one call of the CPU kernels "
                    "(decode_layers)")
    block = net.pack_weights()
    if block is not None:
        logger.info("weights: %.1f MB in one block, in the order a decode step reads them "
                    "(transparent huge pages: %s)", block.numel() / 1e6,
                    memory.transparent_huge_pages())
    return net.eval()


def _log_kv_layout(cfg: ModelConfig) -> None:
    """What the KV cache holds per layer group, where some layers slide a window."""
    windows = [cfg.layer_window(i) for i in range(cfg.num_hidden_layers)]
    if not any(windows):
        return
    sliding = sum(w > 0 for w in windows)
    logger.info("KV cache: %d global layer(s) attend to the whole context; %d sliding-window "
                "layer(s) read only each query's last %d positions (their blocks hold the "
                "whole context like the others')", len(windows) - sliding, sliding,
                cfg.sliding_window)


@dataclass
class LoadedModel:
    model: torch.nn.Module  # on its device, in eval mode
    checkpoint: Checkpoint
    max_model_len: int
    dtype: torch.dtype  # of activations (and of the weights that are not quantized)
    quantization: str  # none | gguf | int8 | int4


def load_model_from_config(config: EngineConfig, device: torch.device) -> LoadedModel:
    """One model, no engine (for measurements and tests)."""
    dtype, quant = resolve_precision(config, device)
    ckpt, max_len = open_model(config.model, dtype, config.max_model_len, quant)
    net = load_model(ckpt, dtype, device, max_len, quantization=quant,
                     group_size=config.int4_group_size)
    return LoadedModel(net, ckpt, max_len, dtype, quant)
