"""Serving workloads: presets, the client job each one runs, and its warmup requests.

Every workload is ``num_groups`` groups of ``prompts_per_group`` requests. The requests of a group
share a prefix; what that prefix is depends on ``kind`` (lengths in tokens):

=================  ===============================================================================
kind               request = ...                                            client
=================  ===============================================================================
shared-prefix      group's system prompt (``system_prompt_len``) + own question  ``generated-shared-prefix``
                   (``question_len``)
multi-level        one system prompt shared by all (``system_prompt_len``) +     ``custom`` (a JSONL file
                   the group's few-shot block (``fewshot_len``) + own question   this module writes)
                   (``question_len``): a radix tree of depth 2
parallel-sampling  the group's prompt (``system_prompt_len``), sampled           ``serving_parallel``
                   ``prompts_per_group`` times by one request with               (/generate streams one
                   ``sampling_params.n`` = ``prompts_per_group``                 request per prompt)
no-sharing         its own random prompt of ``question_len * U(range_ratio, 1)``  ``random-ids``
                   tokens; ``num_groups`` requests, ``prompts_per_group`` = 1
mixed              a system prompt drawn from ``num_groups`` by Zipf popularity    ``generated-shared-prefix``
                   (``zipf_alpha``) + own question; system prompt, question and   with ``zipf`` groups
                   output lengths each ``len * U(range_ratio, 1)``; requests
                   arrive over time (``request_rate``)
=================  ===============================================================================

and generates exactly ``output_len`` tokens (EOS ignored; no-sharing and mixed: ``output_len *
U(range_ratio, 1)``). ``sglang.benchmark.serving`` cannot express ``n > 1`` (its streaming parser
reads one sequence per request), hence the parallel-sampling client of our own, which computes the
metrics with the stock client's ``calculate_metrics``.

``mixed`` is the long-running workload of issue 5 (fragmentation over time): ``num_groups *
prompts_per_group`` requests in shuffled order at Poisson arrivals of ``request_rate`` per second,
so that groups form, grow, finish and are evicted while the pool fills. The Zipf popularity gives a
few hot system prompts with many questions each and a long tail of prompts asked once or twice,
far apart in time: requests that share nothing while they run. One stock client invocation makes
both, with lengths varied by ``range_ratio``.

Every workload but parallel sampling takes a ``request_rate`` (requests/s, Poisson arrivals;
``None``: all at time 0, mixed needs one). Each preset has a ``full`` and a ``quick`` size
(``PRESETS``); any field can be overridden.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"  # never anything else
KINDS = ("shared-prefix", "multi-level", "parallel-sampling", "no-sharing", "mixed")
SIZE_FIELDS = ("num_groups", "prompts_per_group", "system_prompt_len", "fewshot_len", "question_len",
               "output_len")
# The fields each kind uses; an override of another field leaves that workload alone.
USED_FIELDS = {
    "shared-prefix": {"num_groups", "prompts_per_group", "system_prompt_len", "question_len", "output_len",
                      "request_rate"},
    "multi-level": {"num_groups", "prompts_per_group", "system_prompt_len", "fewshot_len", "question_len",
                    "output_len", "request_rate"},
    "parallel-sampling": {"num_groups", "prompts_per_group", "system_prompt_len", "output_len"},
    "no-sharing": {"num_groups", "question_len", "output_len", "range_ratio", "request_rate"},
    "mixed": {"num_groups", "prompts_per_group", "system_prompt_len", "question_len", "output_len", "range_ratio",
              "request_rate"},
}
REPO_ROOT = Path(__file__).resolve().parents[1]  # where `python -m scripts.<tool>` runs
PARALLEL_CLIENT = "scripts.serving_parallel"  # module of the parallel-sampling client
# Rough H100 rates for the printed plan only (Llama-3-8B shape): prefill of distinct prompt tokens,
# one decode step at up to a few hundred requests, and fixed costs per workload (warmup, flushes,
# the stock client's 1 s pause).
EST_PREFILL_TOK_S = 20000.0
EST_DECODE_STEP_S = 0.03
EST_WORKLOAD_OVERHEAD_S = 3.0


@dataclass(frozen=True)
class Workload:
    """One serving workload (see the module docstring); lengths in tokens, ``range_ratio`` in (0, 1],
    ``request_rate`` in requests/s (``None``: all at time 0)."""

    kind: str
    num_groups: int
    prompts_per_group: int
    system_prompt_len: int
    question_len: int
    output_len: int
    fewshot_len: int = 0
    range_ratio: float = 1.0
    zipf_alpha: float = 0.0  # mixed only: P(system prompt of rank k) ~ k ** -zipf_alpha
    request_rate: float | None = None
    ordered: bool = False  # shared-prefix only: each group's requests sent together (--gsp-ordered), not shuffled

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("num_groups", "prompts_per_group", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.system_prompt_len, self.question_len, self.fewshot_len) < 0:
            raise ValueError(f"lengths must be >= 0: {self}")
        if not 0.0 < self.range_ratio <= 1.0:
            raise ValueError(f"range_ratio must be in (0, 1], got {self.range_ratio}")
        rules = {
            "shared-prefix": self.system_prompt_len > 0 and self.question_len > 0 and self.fewshot_len == 0,
            "multi-level": min(self.system_prompt_len, self.fewshot_len, self.question_len) > 0,
            "parallel-sampling": self.system_prompt_len > 0 and self.question_len == self.fewshot_len == 0,
            "no-sharing": (self.prompts_per_group == 1 and self.system_prompt_len == self.fewshot_len == 0
                           and self.question_len > 0),
            "mixed": self.system_prompt_len > 0 and self.question_len > 0 and self.fewshot_len == 0,
        }
        if not rules[self.kind]:
            raise ValueError(f"lengths do not fit kind {self.kind!r} (module docstring): {self}")
        if self.kind not in ("no-sharing", "mixed") and self.range_ratio != 1.0:
            raise ValueError(f"range_ratio applies to no-sharing and mixed only: {self}")
        if (self.kind == "mixed") != (self.zipf_alpha > 0) or not math.isfinite(self.zipf_alpha):
            raise ValueError(f"mixed needs a finite zipf_alpha > 0, the other kinds none: {self}")
        rate = self.request_rate
        if rate is not None and not (math.isfinite(rate) and rate > 0 and self.kind != "parallel-sampling"):
            raise ValueError(f"request_rate must be finite and > 0 (parallel sampling: None), got {rate}")
        if self.kind == "mixed" and rate is None:
            raise ValueError(f"mixed needs a request_rate: {self}")
        if self.ordered and self.kind != "shared-prefix":
            raise ValueError(f"ordered applies to shared-prefix only: {self}")
        if self.kind == "multi-level" and self.output_len < 4:
            raise ValueError("multi-level: output_len must be >= 4 (the custom dataset's minimum)")

    @property
    def num_requests(self) -> int:
        """Sequences generated (parallel sampling: prompts x n)."""
        return self.num_groups * self.prompts_per_group

    def describe(self) -> str:
        """One line for plans and table headers."""
        g, p, out = self.num_groups, self.prompts_per_group, self.output_len
        return {
            "shared-prefix": f"{g} groups x {p}, system {self.system_prompt_len} + question "
                             f"{self.question_len}, output {out}" + (", each group in a burst" if self.ordered else ""),
            "multi-level": f"system {self.system_prompt_len} -> {g} few-shot blocks x {self.fewshot_len}"
                           f" -> {p} questions x {self.question_len} each, output {out}",
            "parallel-sampling": f"{g} prompts x {self.system_prompt_len}, n = {p} samples each, output {out}",
            "no-sharing": f"{g} requests, input {self.question_len} and output {out} each scaled by"
                          f" U({self.range_ratio}, 1)",
            "mixed": f"{self.num_requests} requests, system prompt from {g} by Zipf({self.zipf_alpha}) x"
                     f" {self.system_prompt_len} + question {self.question_len}, output {out}, lengths scaled by"
                     f" U({self.range_ratio}, 1)",
        }[self.kind] + (f"; {self.request_rate:g} requests/s" if self.request_rate else "")


def _pair(full: Workload, **quick) -> dict[str, Workload]:
    return {"full": full, "quick": dataclasses.replace(full, **quick)}


PRESETS: dict[str, dict[str, Workload]] = {
    # ANCHORS.md's decode-heavy shared prefix.
    "anchors": _pair(Workload("shared-prefix", 8, 32, 4096, 64, 1024), output_len=128),
    "prefill-heavy": _pair(Workload("shared-prefix", 64, 8, 2048, 256, 16), num_groups=16),
    "multi-level": _pair(Workload("multi-level", 8, 32, 4096, 64, 512, fewshot_len=2048),
                         num_groups=4, prompts_per_group=16, system_prompt_len=2048, fewshot_len=1024,
                         output_len=128),
    "parallel-sampling": _pair(Workload("parallel-sampling", 16, 16, 4096, 0, 512),
                               num_groups=8, system_prompt_len=2048, output_len=128),
    "no-sharing": _pair(Workload("no-sharing", 128, 1, 0, 2048, 512, range_ratio=0.25),
                        num_groups=64, question_len=1024, output_len=128),
    # Issue 5's long-running workload: 1560 requests over 130 s (quick: 960 over 60 s); the pool
    # (about 0.4 M tokens for Llama-3-8B on an H100) fills with about 1 M distinct tokens.
    "mixed": _pair(Workload("mixed", 260, 6, 2048, 256, 512, range_ratio=0.25, zipf_alpha=1.1, request_rate=12.0),
                   num_groups=160, request_rate=16.0),
    # Issue 19: prefill-heavy shared prefix at 512 concurrent requests (above SGLang's default
    # decode-graph range of 256 on an H200) with 128 output tokens; quick: the same 512 requests.
    "prefill-heavy-512": _pair(Workload("shared-prefix", 64, 8, 2048, 256, 128)),
    # The same requests with each group's 8 sent one after another (RL rollouts, agents' parallel
    # calls): SGLang admits a group's requests before the first one's prefix is in the tree.
    "prefill-burst-512": _pair(Workload("shared-prefix", 64, 8, 2048, 256, 128, ordered=True)),
    # Issue 19: Poisson arrivals over Zipf-popular groups, long enough to mix extend and decode
    # batches (quick: 480 requests over 30 s).
    "zipf-poisson": _pair(Workload("mixed", 120, 8, 2048, 256, 256, range_ratio=0.5, zipf_alpha=1.1,
                                   request_rate=16.0), num_groups=60),
    # Single-purpose presets of the first version (not in --workloads all).
    "short": _pair(Workload("shared-prefix", 8, 32, 4096, 64, 128)),  # verification runs
    "smoke": _pair(Workload("shared-prefix", 2, 4, 256, 16, 16)),
}
ALL_WORKLOADS = ("anchors", "prefill-heavy", "multi-level", "parallel-sampling", "no-sharing")


def resolve_workload(name: str, mode: str = "full", overrides: dict | None = None) -> Workload:
    """Preset ``name`` at size ``mode`` ("full" or "quick") with every non-None override of a field
    its kind uses (``USED_FIELDS``) applied; a ``request_rate`` override of ``inf`` means all at time
    0. Raises ``KeyError`` on an unknown name, ``ValueError`` on an invalid result."""
    if name not in PRESETS:
        raise KeyError(f"unknown workload {name!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[name][mode]
    changes = {k: v for k, v in (overrides or {}).items() if v is not None and k in USED_FIELDS[preset.kind]}
    if changes.get("request_rate") == math.inf:
        changes["request_rate"] = None
    return dataclasses.replace(preset, **changes)


def rate_arg(w: Workload) -> str:
    """``w``'s request rate as the stock client's ``--request-rate`` ("inf": all at time 0)."""
    return "inf" if w.request_rate is None else f"{w.request_rate:g}"


def expected_input_tokens(w: Workload) -> int | None:
    """Prompt tokens the client should count (one prompt per generated sequence; no BOS with our
    tokenizer); None for no-sharing and mixed, whose lengths are random."""
    if w.kind in ("no-sharing", "mixed"):
        return None
    return w.num_requests * (w.system_prompt_len + w.fewshot_len + w.question_len)


def distinct_prompt_tokens(w: Workload) -> int:
    """Prompt tokens a radix cache prefills (each shared prefix once); no-sharing: the mean; mixed:
    the mean with every system prompt asked (an upper bound: the tail holds prompts never drawn)."""
    if w.kind == "no-sharing":
        return int(w.num_groups * w.question_len * (1 + w.range_ratio) / 2)
    if w.kind == "mixed":
        return int((w.num_groups * w.system_prompt_len + w.num_requests * w.question_len) * (1 + w.range_ratio) / 2)
    per_request = w.question_len if w.kind != "parallel-sampling" else 0
    return (w.system_prompt_len * (1 if w.kind == "multi-level" else w.num_groups)
            + w.num_groups * w.fewshot_len + w.num_requests * per_request)


def estimate_seconds(w: Workload) -> float:
    """Rough wall time of one workload on one H100 with its warmup (for the printed plan): prefill, or
    the arrivals when they take longer, then the last request's decode."""
    arrivals = w.num_requests / w.request_rate if w.request_rate else 0.0
    return (max(distinct_prompt_tokens(w) / EST_PREFILL_TOK_S, arrivals) + w.output_len * EST_DECODE_STEP_S
            + EST_WORKLOAD_OVERHEAD_S)


def warmup_workload(w: Workload) -> Workload:
    """The same shape, small: at most 2 groups of 4 (no-sharing: 8 requests), at most 16 tokens out."""
    if w.kind == "no-sharing":
        return dataclasses.replace(w, num_groups=min(w.num_groups, 8), output_len=min(w.output_len, 16))
    return dataclasses.replace(w, num_groups=min(w.num_groups, 2), prompts_per_group=min(w.prompts_per_group, 4),
                               output_len=min(w.output_len, 16))


def warmup_bodies(w: Workload, seed: int, vocab_size: int) -> list[dict]:
    """JSON bodies of SGLang ``/generate`` requests (``input_ids``, not streamed) of the shape of
    ``warmup_workload(w)``, with random token ids in [3, ``vocab_size``) drawn from ``seed``: sent all
    at once before the measured run, so one-time JIT compilation does not land in its TTFT."""
    ww, rng = warmup_workload(w), random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, vocab_size) for _ in range(n)]

    def body(input_ids: list[int], output_len: int, n: int = 1) -> dict:
        params = {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0.0}
        return {"input_ids": input_ids, "sampling_params": params | ({"n": n} if n > 1 else {})}

    if ww.kind == "no-sharing":
        low = max(1, int(ww.question_len * ww.range_ratio))
        return [body(ids(rng.randint(low, ww.question_len)), ww.output_len) for _ in range(ww.num_groups)]
    if ww.kind == "parallel-sampling":
        return [body(ids(ww.system_prompt_len), ww.output_len, ww.prompts_per_group)
                for _ in range(ww.num_groups)]
    system = ids(ww.system_prompt_len)
    bodies = []
    for _ in range(ww.num_groups):
        shared = system + ids(ww.fewshot_len) if ww.kind == "multi-level" else ids(ww.system_prompt_len)
        bodies += [body(shared + ids(ww.question_len), ww.output_len) for _ in range(ww.prompts_per_group)]
    return bodies


def write_multilevel_dataset(w: Workload, seed: int, tokenizer, path: Path) -> Path:
    """Write ``w``'s requests as a JSONL file that ``sglang.benchmark.serving --dataset-name custom``
    reads: one line per request, ``{"conversations": [{"content": prompt}, {"content": "-"}]}``, the
    prompt ``system + "\\n\\n" + block + "\\n\\n" + question`` built with the stock client's
    ``gen_prompt`` (random token ids decoded by ``tokenizer``) from ``random.seed(seed)``."""
    from sglang.benchmark.datasets.common import gen_prompt

    if w.kind != "multi-level":
        raise ValueError(f"not a multi-level workload: {w}")
    random.seed(seed)
    system = gen_prompt(tokenizer, w.system_prompt_len)
    lines = []
    for _ in range(w.num_groups):
        block = gen_prompt(tokenizer, w.fewshot_len)
        for _ in range(w.prompts_per_group):
            prompt = f"{system}\n\n{block}\n\n{gen_prompt(tokenizer, w.question_len)}"
            lines.append(json.dumps({"conversations": [{"content": prompt}, {"content": "-"}]}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def client_job(w: Workload, *, model_dir: Path, tokenizer: Path, port: int, seed: int, output_file: Path,
               dataset_file: Path | None = None, extra_args: list[str] = ()) -> dict:
    """The measured client run for ``w``: ``{"client": "sglang" | "parallel", "argv": [...]}``, the
    arguments of ``python -m sglang.benchmark.serving`` (at ``w.request_rate``) or of
    ``python -m scripts.serving_parallel``. ``dataset_file``: multi-level only."""
    if w.kind == "parallel-sampling":
        argv = ["--host", HOST, "--port", str(port), "--tokenizer", str(tokenizer),
                "--num-prompts", str(w.num_groups), "--n", str(w.prompts_per_group),
                "--prompt-len", str(w.system_prompt_len), "--output-len", str(w.output_len),
                "--seed", str(seed), "--output-file", str(output_file)]
        return {"client": "parallel", "argv": argv + list(extra_args)}
    argv = ["--backend", "sglang", "--host", HOST, "--port", str(port), "--model", str(model_dir),
            "--tokenizer", str(tokenizer)]
    if w.kind == "shared-prefix":
        argv += ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(w.num_groups),
                 "--gsp-prompts-per-group", str(w.prompts_per_group),
                 "--gsp-system-prompt-len", str(w.system_prompt_len), "--gsp-question-len", str(w.question_len),
                 "--gsp-output-len", str(w.output_len), "--gsp-range-ratio", "1.0"]
        argv += ["--gsp-ordered"] if w.ordered else []
    elif w.kind == "mixed":  # the stock client shuffles the requests (no --gsp-ordered)
        argv += ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(w.num_groups),
                 "--gsp-prompts-per-group", str(w.prompts_per_group),
                 "--gsp-system-prompt-len", str(w.system_prompt_len), "--gsp-question-len", str(w.question_len),
                 "--gsp-output-len", str(w.output_len), "--gsp-range-ratio", str(w.range_ratio),
                 "--gsp-group-distribution", "zipf", "--gsp-zipf-alpha", str(w.zipf_alpha)]
    elif w.kind == "multi-level":
        if dataset_file is None:
            raise ValueError("multi-level needs dataset_file (write_multilevel_dataset)")
        argv += ["--dataset-name", "custom", "--dataset-path", str(dataset_file),
                 "--sharegpt-output-len", str(w.output_len)]
    else:
        argv += ["--dataset-name", "random-ids", "--random-input-len", str(w.question_len),
                 "--random-output-len", str(w.output_len), "--random-range-ratio", str(w.range_ratio)]
    # The driver warms up and flushes the cache itself: the stock single-request warmup would leave
    # one prompt in the radix cache.
    argv += ["--num-prompts", str(w.num_requests), "--request-rate", rate_arg(w), "--seed", str(seed),
             "--warmup-requests", "0", "--output-file", str(output_file), "--disable-tqdm"]
    return {"client": "sglang", "argv": argv + list(extra_args)}


def job_command(python: str, job: dict) -> list[str]:
    """The standalone command equivalent to ``job`` (the driver runs it inside the client runner,
    ``scripts.serving_client``); the parallel-sampling client's runs from :data:`REPO_ROOT`."""
    module = "sglang.benchmark.serving" if job["client"] == "sglang" else PARALLEL_CLIENT
    return [python, "-m", module, *job["argv"]]


def dataset_cache_files(w: Workload, seed: int, home: Path | None = None) -> list[Path]:
    """Cached prompt pickles sglang.benchmark would reuse for a shared-prefix (or mixed) ``w`` and
    ``seed`` (any tokenizer class); empty for other kinds and for mixed with ``range_ratio`` < 1, which
    the stock client does not cache. A pickle written with another tokenizer gives prompts of other
    token lengths."""
    if w.kind not in ("shared-prefix", "mixed") or w.range_ratio != 1.0:
        return []
    cache_dir = (home or Path.home()) / ".cache" / "sglang" / "benchmark"
    zipf = f"_zipf_{w.zipf_alpha}" if w.kind == "mixed" else ""
    stem = (f"gen_shared_prefix_{seed}_{w.num_groups}_{w.prompts_per_group}_{w.system_prompt_len}_"
            f"{w.question_len}_{w.output_len}{zipf}_")
    return sorted(cache_dir.glob(stem + "*.pkl")) if cache_dir.is_dir() else []
