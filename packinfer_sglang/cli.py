"""``packinfer``: ``demo`` (the default; runs without a GPU) and ``serve`` (SGLang with PackInfer).

    packinfer demo [--groups 4 --prompts-per-group 8 ...]
    packinfer serve [--verify] [--min-prefix-tokens N] -- --model-path DIR [any sglang.launch_server flag]
"""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args) -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is imported
    from .demo import format_demo, run_demo

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"packinfer demo on {device}{' (Triton interpreter)' if device == 'cpu' else ''}: "
          f"{args.groups} groups x {args.prompts_per_group} prompts, system {args.system_len} tokens, "
          f"question {args.question_len}, {args.decoded} decoded tokens each", flush=True)
    result = run_demo(args.groups, args.prompts_per_group, args.system_len, args.question_len, args.decoded,
                      args.num_qo_heads, args.num_kv_heads, args.head_dim, dtype, args.seed, device)
    print(format_demo(result))
    ok = result.rel_err < (2e-2 if dtype == torch.bfloat16 else 2e-3)
    print("OK: packed == flat" if ok else "FAIL: packed != flat")
    return 0 if ok else 1


def _serve(args, rest: list[str]) -> int:
    env = dict(os.environ)
    if args.verify:
        env["PACKINFER_VERIFY"] = "1"
    if args.min_prefix_tokens is not None:
        env["PACKINFER_MIN_PREFIX_TOKENS"] = str(args.min_prefix_tokens)
    if args.min_group_size is not None:
        env["PACKINFER_MIN_GROUP_SIZE"] = str(args.min_group_size)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="packinfer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="group a shared-prefix workload in SGLang's radix cache and run the "
                                    "packed kernel against flat attention (no GPU needed)")
    d.add_argument("--groups", type=int, default=4, help="distinct system prompts")
    d.add_argument("--prompts-per-group", type=int, default=8, help="requests per system prompt")
    d.add_argument("--system-len", type=int, default=256, help="system prompt length, tokens")
    d.add_argument("--question-len", type=int, default=16, help="per-request question length, tokens")
    d.add_argument("--decoded", type=int, default=4, help="tokens already decoded per request")
    d.add_argument("--num-qo-heads", type=int, default=8, help="query heads")
    d.add_argument("--num-kv-heads", type=int, default=2, help="KV heads")
    d.add_argument("--head-dim", type=int, default=64, choices=[64, 128, 256], help="head dimension")
    d.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="q/KV dtype")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    s = sub.add_parser("serve", help="start sglang.launch_server with --attention-backend packinfer "
                                     "--radix-cache-backend packinfer; other flags pass through")
    s.add_argument("--verify", action="store_true",
                   help="check every packed decode layer against SGLang's Triton decode (slow; debugging)")
    s.add_argument("--min-prefix-tokens", type=int, help="shortest shared prefix that forms a group, tokens")
    s.add_argument("--min-group-size", type=int, help="fewest running requests that form a group")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv or ["demo"])
    if args.command == "serve":
        return _serve(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
