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
parallel-sampling  the group's prompt (``system_prompt_len``), sampled           ``serving_parallel.py``
                   ``prompts_per_group`` times by one request with               (/generate streams one
                   ``sampling_params.n`` = ``prompts_per_group``                 request per prompt)
no-sharing         its own random prompt of ``question_len * U(range_ratio, 1)``  ``random-ids``
                   tokens; ``num_groups`` requests, ``prompts_per_group`` = 1
=================  ===============================================================================

and generates exactly ``output_len`` tokens (EOS ignored; no-sharing: ``output_len * U(range_ratio,
1)``). ``sglang.benchmark.serving`` cannot express ``n > 1`` (its streaming parser reads one
sequence per request), hence the parallel-sampling client of our own, which computes the metrics
with the stock client's ``calculate_metrics``.

Each preset has a ``full`` and a ``quick`` size (``PRESETS``); any field can be overridden.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"  # never anything else
KINDS = ("shared-prefix", "multi-level", "parallel-sampling", "no-sharing")
SIZE_FIELDS = ("num_groups", "prompts_per_group", "system_prompt_len", "fewshot_len", "question_len",
               "output_len")
# The fields each kind uses; an override of another field leaves that workload alone.
USED_FIELDS = {
    "shared-prefix": {"num_groups", "prompts_per_group", "system_prompt_len", "question_len", "output_len"},
    "multi-level": {"num_groups", "prompts_per_group", "system_prompt_len", "fewshot_len", "question_len",
                    "output_len"},
    "parallel-sampling": {"num_groups", "prompts_per_group", "system_prompt_len", "output_len"},
    "no-sharing": {"num_groups", "question_len", "output_len", "range_ratio"},
}
SCRIPTS = Path(__file__).resolve().parent
# Rough H100 rates for the printed plan only (Llama-3-8B shape): prefill of distinct prompt tokens,
# one decode step at up to a few hundred requests, and fixed costs per workload (warmup, flushes,
# the stock client's 1 s pause).
EST_PREFILL_TOK_S = 20000.0
EST_DECODE_STEP_S = 0.03
EST_WORKLOAD_OVERHEAD_S = 3.0


@dataclass(frozen=True)
class Workload:
    """One serving workload (see the module docstring); lengths in tokens, ``range_ratio`` in (0, 1]."""

    kind: str
    num_groups: int
    prompts_per_group: int
    system_prompt_len: int
    question_len: int
    output_len: int
    fewshot_len: int = 0
    range_ratio: float = 1.0

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
        }
        if not rules[self.kind]:
            raise ValueError(f"lengths do not fit kind {self.kind!r} (module docstring): {self}")
        if self.kind != "no-sharing" and self.range_ratio != 1.0:
            raise ValueError(f"range_ratio applies to no-sharing only: {self}")
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
                             f"{self.question_len}, output {out}",
            "multi-level": f"system {self.system_prompt_len} -> {g} few-shot blocks x {self.fewshot_len}"
                           f" -> {p} questions x {self.question_len} each, output {out}",
            "parallel-sampling": f"{g} prompts x {self.system_prompt_len}, n = {p} samples each, output {out}",
            "no-sharing": f"{g} requests, input {self.question_len} and output {out} each scaled by"
                          f" U({self.range_ratio}, 1)",
        }[self.kind]


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
    # Single-purpose presets of the first version (not in --workloads all).
    "short": _pair(Workload("shared-prefix", 8, 32, 4096, 64, 128)),  # verification runs
    "smoke": _pair(Workload("shared-prefix", 2, 4, 256, 16, 16)),
}
ALL_WORKLOADS = ("anchors", "prefill-heavy", "multi-level", "parallel-sampling", "no-sharing")


def resolve_workload(name: str, mode: str = "full", overrides: dict | None = None) -> Workload:
    """Preset ``name`` at size ``mode`` ("full" or "quick") with every non-None override of a field
    its kind uses (``USED_FIELDS``) applied. Raises ``KeyError`` on an unknown name, ``ValueError``
    on an invalid result."""
    if name not in PRESETS:
        raise KeyError(f"unknown workload {name!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[name][mode]
    changes = {k: v for k, v in (overrides or {}).items() if v is not None and k in USED_FIELDS[preset.kind]}
    return dataclasses.replace(preset, **changes)


def expected_input_tokens(w: Workload) -> int | None:
    """Prompt tokens the client should count (one prompt per generated sequence; no BOS with our
    tokenizer); None for no-sharing, whose lengths are random."""
    if w.kind == "no-sharing":
        return None
    return w.num_requests * (w.system_prompt_len + w.fewshot_len + w.question_len)


def distinct_prompt_tokens(w: Workload) -> int:
    """Prompt tokens a radix cache prefills (each shared prefix once); no-sharing: the mean."""
    if w.kind == "no-sharing":
        return int(w.num_groups * w.question_len * (1 + w.range_ratio) / 2)
    per_request = w.question_len if w.kind != "parallel-sampling" else 0
    return (w.system_prompt_len * (1 if w.kind == "multi-level" else w.num_groups)
            + w.num_groups * w.fewshot_len + w.num_requests * per_request)


def estimate_seconds(w: Workload) -> float:
    """Rough wall time of one workload on one H100 with its warmup (for the printed plan)."""
    return (distinct_prompt_tokens(w) / EST_PREFILL_TOK_S + w.output_len * EST_DECODE_STEP_S
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
               dataset_file: Path | None = None, request_rate: str = "inf",
               extra_args: list[str] = ()) -> dict:
    """The measured client run for ``w``: ``{"client": "sglang" | "parallel", "argv": [...]}``, the
    arguments of ``python -m sglang.benchmark.serving`` or of ``scripts/serving_parallel.py``.
    ``request_rate`` "inf" sends every request at time 0. ``dataset_file``: multi-level only."""
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
    argv += ["--num-prompts", str(w.num_requests), "--request-rate", request_rate, "--seed", str(seed),
             "--warmup-requests", "0", "--output-file", str(output_file), "--disable-tqdm"]
    return {"client": "sglang", "argv": argv + list(extra_args)}


def job_command(python: str, job: dict) -> list[str]:
    """The standalone command equivalent to ``job`` (the driver runs it inside serving_client.py)."""
    head = ["-m", "sglang.benchmark.serving"] if job["client"] == "sglang" else [str(SCRIPTS / "serving_parallel.py")]
    return [python, *head, *job["argv"]]


def dataset_cache_files(w: Workload, seed: int, home: Path | None = None) -> list[Path]:
    """Cached prompt pickles sglang.benchmark would reuse for a shared-prefix ``w`` and ``seed`` (any
    tokenizer class); empty for other kinds. A pickle written with another tokenizer gives prompts
    of other token lengths."""
    if w.kind != "shared-prefix":
        return []
    cache_dir = (home or Path.home()) / ".cache" / "sglang" / "benchmark"
    stem = (f"gen_shared_prefix_{seed}_{w.num_groups}_{w.prompts_per_group}_{w.system_prompt_len}_"
            f"{w.question_len}_{w.output_len}_")
    return sorted(cache_dir.glob(stem + "*.pkl")) if cache_dir.is_dir() else []
