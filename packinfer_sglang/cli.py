"""``packinfer``: ``demo`` (the default; runs without a GPU) and ``serve`` (SGLang with PackInfer).

    packinfer demo [--groups 4 --prompts-per-group 8 ...]
    packinfer serve [--verify] [--min-prefix-tokens N] -- --model-path DIR [any sglang.launch_server flag]
    packinfer --version

Both read and validate every ``PACKINFER_*`` variable first: a bad one exits with code 2 and one
line naming it (:mod:`packinfer_sglang.config`).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata

from . import __version__
from .config import ConfigError, env_name, validate_environment

EXIT_USAGE = 2


def _version() -> str:
    try:
        sglang = metadata.version("sglang")
    except metadata.PackageNotFoundError:
        sglang = "not installed"
    return f"packinfer-sglang {__version__} (sglang {sglang})"


def _at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _fail(message: str) -> int:
    print(f"packinfer: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _demo(args, config) -> int:
    import torch

    if args.num_qo_heads % args.num_kv_heads:
        return _fail(f"--num-qo-heads {args.num_qo_heads} must be a multiple of --num-kv-heads {args.num_kv_heads}")
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is imported
    from .demo import format_demo, run_demo

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"packinfer demo on {device}{' (Triton interpreter)' if device == 'cpu' else ''}: "
          f"{args.groups} groups x {args.prompts_per_group} prompts, system {args.system_len} tokens, "
          f"question {args.question_len}, {args.decoded} decoded tokens each; grouping with "
          f"min_prefix_tokens {config.min_prefix_tokens}, min_group_size {config.min_group_size} "
          f"(other PACKINFER_* settings apply to serving only)", flush=True)
    result = run_demo(args.groups, args.prompts_per_group, args.system_len, args.question_len, args.decoded,
                      args.num_qo_heads, args.num_kv_heads, args.head_dim, dtype, args.seed, device, config=config)
    print(format_demo(result))
    ok = result.rel_err < (2e-2 if dtype == torch.bfloat16 else 2e-3)
    print("OK: packed == flat" if ok else "FAIL: packed != flat")
    return 0 if ok else 1


def _serve(args, rest: list[str]) -> int:
    env = dict(os.environ)
    if args.verify:
        env[env_name("verify")] = "1"
    if args.min_prefix_tokens is not None:
        env[env_name("min_prefix_tokens")] = str(args.min_prefix_tokens)
    if args.min_group_size is not None:
        env[env_name("min_group_size")] = str(args.min_group_size)
    try:
        validate_environment(env)
    except ConfigError as e:
        return _fail(str(e))
    import torch

    if not torch.cuda.is_available():
        return _fail("serve needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
                     "`packinfer demo` runs on a CPU")
    rest = [a for a in rest if a != "--"]
    cmd = [sys.executable, "-m", "sglang.launch_server"]
    if not any(a.startswith("--attention-backend") for a in rest):
        cmd += ["--attention-backend", "packinfer"]
    if not any(a.startswith("--radix-cache-backend") for a in rest):
        cmd += ["--radix-cache-backend", "packinfer"]
    cmd += rest
    print("+", " ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


DEMO_HEAD_DIMS = (64, 96, 128, 256)  # kernels.checks.SUPPORTED_HEAD_DIMS, without importing the kernels
# (Triton must see TRITON_INTERPRET before the first kernel is imported; tests/test_cli.py checks equality)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="packinfer", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="group a shared-prefix workload in SGLang's radix cache and run the "
                                    "packed kernel against flat attention (no GPU needed)")
    d.add_argument("--groups", type=_at_least(1), default=4, help="distinct system prompts")
    d.add_argument("--prompts-per-group", type=_at_least(1), default=8, help="requests per system prompt")
    d.add_argument("--system-len", type=_at_least(1), default=256, help="system prompt length, tokens")
    d.add_argument("--question-len", type=_at_least(0), default=16, help="per-request question length, tokens")
    d.add_argument("--decoded", type=_at_least(0), default=4, help="tokens already decoded per request")
    d.add_argument("--num-qo-heads", type=_at_least(1), default=8, help="query heads")
    d.add_argument("--num-kv-heads", type=_at_least(1), default=2, help="KV heads (must divide the query heads)")
    d.add_argument("--head-dim", type=int, default=64, choices=DEMO_HEAD_DIMS, help="head dimension")
    d.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="q/KV dtype")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    s = sub.add_parser("serve", help="start sglang.launch_server with --attention-backend packinfer "
                                     "--radix-cache-backend packinfer; other flags pass through")
    s.add_argument("--verify", action="store_true",
                   help="check every packed decode layer against SGLang's Triton decode (slow; debugging)")
    s.add_argument("--min-prefix-tokens", type=_at_least(1),
                   help="shortest shared prefix that forms a group, tokens (PACKINFER_MIN_PREFIX_TOKENS)")
    s.add_argument("--min-group-size", type=_at_least(2),
                   help="fewest running requests that form a group (PACKINFER_MIN_GROUP_SIZE)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv or ["demo"])
    if args.command == "serve":
        return _serve(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        config = validate_environment()
    except ConfigError as e:
        return _fail(str(e))
    if args.command is None:  # options without a command: the demo's defaults
        args = parser.parse_args(["demo"])
    return _demo(args, config)


if __name__ == "__main__":
    sys.exit(main())
