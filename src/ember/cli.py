"""`ember` command line: generate | serve | bench.

Engine flags are generated from `EngineConfig`'s fields, so the CLI, `LLM(...)` and the logs
share one name and one help text for every setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Sequence

from ember.config import (
    DEFAULT_MAX_BODY_BYTES, DEFAULT_SEND_TIMEOUT, DataParallelConfig, EngineConfig,
)
from ember.errors import EmberError



def _json_object(text: str) -> dict:
    """A JSON object flag (`--speculative-config`); EngineConfig validates its keys."""
    value = json.loads(text)  # a ValueError: argparse reports the flag's invalid value
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


_json_object.__name__ = "JSON object"  # argparse names the type in its error
_TYPES = {"str": str, "int": int, "float": float, "SpeculativeConfig": _json_object}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser, EngineConfig, "engine")


def _add_config_args(parser: argparse.ArgumentParser, config: type, title: str) -> None:
    """One flag per field of the `config` dataclass, with its help text."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).split(" | ")[0]
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                               help=f.metadata["help"])
        else:
            text = f.metadata["help"]  # a help that explains its default keeps its words
            group.add_argument(flag, type=_TYPES[kind], default=f.default, help=text if
                               "(default:" in text else text + " (default: %(default)s)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})


def data_parallel_config(args: argparse.Namespace) -> DataParallelConfig:
    return DataParallelConfig(**{f.name: getattr(args, f.name)
                                 for f in dataclasses.fields(DataParallelConfig)})


def _launched_worker(config: EngineConfig) -> int | None:
    """Under torchrun, ranks > 0 serve rank 0's steps instead of running the command."""
    from ember.distributed.parallel_state import parallel_plan

    plan = parallel_plan(config)
    if plan is None or not plan.is_worker:
        return None
    from ember.distributed.worker import run_launched_worker

    return run_launched_worker(plan, config)


def _generate(args: argparse.Namespace) -> int:
    from ember.engine.llm_engine import LLMEngine
    from ember.sampling_params import SamplingParams

    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
        seed=args.sampling_seed,
    )
    engine = LLMEngine(engine_config(args))  # under torchrun, ranks > 0 stay in here
    tok = engine.tokenizer
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt: str | list[int] = tok.encode(tok.apply_chat_template(messages),
                                             add_special_tokens=False)
    else:
        prompt = args.prompt
    engine.add_request("cli", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():  # deltas: each step's new text
            sys.stdout.write(out.outputs[0].text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    engine.shutdown()
    return 0


def _serve(args: argparse.Namespace) -> int:
    config = engine_config(args)
    replicas = data_parallel_config(args)
    if replicas.enabled:
        from ember.serving.ray import serve_replicas

        return serve_replicas(args, config, replicas)
    from ember.server.launch import serve

    code = _launched_worker(config)
    return serve(args, config) if code is None else code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ember",
        description="ember: a PyTorch-native LLM inference engine and OpenAI-compatible server.",
    )
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"], help="logging verbosity")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout",
                         description="Generate text for one prompt and stream it to stdout.")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt as a user message in the model's chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--max-tokens", type=int, default=256,
                     help="most tokens to generate (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0 is greedy (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="nucleus sampling probability mass (default: %(default)s)")
    gen.add_argument("--sampling-seed", type=int, default=None,
                     help="seed of this request's sampling (default: from --seed)")
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                         description="Serve the model over an OpenAI-compatible HTTP API: "
                         "/v1/chat/completions, /v1/completions, /v1/models, /tokenize, "
                         "/detokenize, /health, /metrics.")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    srv.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    srv.add_argument("--api-key", action="append", default=None, metavar="KEY",
                     help="require `Authorization: Bearer KEY` on every path but /health "
                     "and /metrics (repeatable; default: the EMBER_API_KEY environment "
                     "variable, if set)")
    srv.add_argument("--metrics-require-key", action="store_true",
                     help="with API keys, /metrics needs one too (default: it stays open)")
    srv.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                     metavar="BYTES", help="larger request bodies are refused with HTTP 413 "
                     "(default: %(default)s)")
    srv.add_argument("--send-timeout", type=float, default=DEFAULT_SEND_TIMEOUT,
                     metavar="SECONDS", help="a streaming client that accepts no data for this "
                     "long is disconnected and its request aborted (default: %(default)s)")
    srv.add_argument("--served-model-name", default=None,
                     help="the model name clients use (default: --model, or the default "
                     "model's file name)")
    srv.add_argument("--uvicorn-log-level", default="info",
                     choices=["critical", "error", "warning", "info", "debug", "trace"],
                     help="uvicorn's log level (default: %(default)s)")
    srv.add_argument("--shutdown-grace", type=float, default=10.0, metavar="SECONDS",
                     help="on SIGTERM/SIGINT, how long in-flight requests may run before they "
                     "are aborted (default: %(default)s)")
    add_engine_args(srv)
    _add_config_args(srv, DataParallelConfig, "replicas (data parallelism)")
    srv.set_defaults(func=_serve)

    bench = sub.add_parser("bench", help="measure latency, serving load or accuracy",
                           description="Measurement tools; each prints a summary and can "
                           "write JSON.")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    from ember.bench import accuracy, latency, serve

    for name, module, doc in (
        ("latency", latency, "one stream: TTFT and ms per output token (median, p90)"),
        ("accuracy", accuracy, "perplexity and top-1 agreement of precision modes"),
    ):
        p = bench_sub.add_parser(name, help=doc, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)
        add_engine_args(p)
        p.set_defaults(func=lambda args, m=module: m.main(args, engine_config(args)))
    # A client of a running server: no engine flags.
    p = bench_sub.add_parser("serve", help="load a running server over the OpenAI protocol: "
                             "TTFT, TPOT, ITL, E2E percentiles and throughput",
                             description=serve.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_args(p)
    p.set_defaults(func=serve.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except EmberError as e:  # user errors: one line, no traceback
        print(f"ember: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
