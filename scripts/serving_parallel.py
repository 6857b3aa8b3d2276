"""Parallel-sampling client: ``--num-prompts`` prompts, each sampled ``--n`` times by one request.

Sends every prompt at time 0 to SGLang's ``/generate`` as ``{"text": prompt, "sampling_params":
{"n": N, "max_new_tokens": L, "ignore_eos": true, "temperature": 0}, "stream": true}``. SGLang
expands such a request into one prefill of the prompt and then N sequences sharing it; the stream
interleaves their chunks, each tagged with ``index``. ``sglang.benchmark.serving`` reads one sequence
per request, so it cannot measure this; this client tracks each sequence as the stock client tracks a
request (TTFT from the request's start, inter-token latencies spread over the tokens of a chunk,
end-to-end latency at the sequence's last chunk) and computes the metrics with the stock client's
``calculate_metrics``, so its rows compare with the others. It appends one JSON line with the stock
client's result keys to ``--output-file``.

Prompts: ``gen_prompt`` of the stock client (random token ids decoded by the tokenizer) after
``random.seed(--seed)``.

    python -m scripts.serving_parallel --port 30000 --tokenizer out/models/llama-3-8b/tokenizer \\
        --num-prompts 16 --n 16 --prompt-len 4096 --output-len 512 --output-file out/ps.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import time

import orjson

# The stock client's result keys that differ from BenchmarkMetrics' field names.
RENAMED = {"total_input": "total_input_tokens", "total_input_text": "total_input_text_tokens",
           "total_input_vision": "total_input_vision_tokens", "total_output": "total_output_tokens",
           "total_output_retokenized": "total_output_tokens_retokenized"}


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of this client."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="server host")
    p.add_argument("--port", type=int, required=True, help="server port")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (prompts and retokenized counts)")
    p.add_argument("--num-prompts", type=int, required=True, help="distinct prompts (one request each)")
    p.add_argument("--n", type=int, required=True, help="samples per prompt (sampling_params.n)")
    p.add_argument("--prompt-len", type=int, required=True, help="tokens per prompt")
    p.add_argument("--output-len", type=int, required=True, help="tokens generated per sample (EOS ignored)")
    p.add_argument("--seed", type=int, default=1, help="seed of the prompts")
    p.add_argument("--output-file", required=True, help="JSONL file the result line is appended to")
    return p


class SampleTracker:
    """Per-sequence timing of one streamed n > 1 request, as the stock client times one request."""

    def __init__(self, n: int, prompt_len: int, start: float):
        from sglang.benchmark.serving import RequestFuncOutput

        self.outputs = [RequestFuncOutput(prompt_len=prompt_len, start_time=start) for _ in range(n)]
        self.last_time = [start] * n
        self.last_len = [0] * n

    def on_chunk(self, data: dict, now: float) -> None:
        """Account one decoded SSE chunk (``text`` cumulative, ``meta_info.completion_tokens``)."""
        if "error" in data:
            raise RuntimeError(f"server error: {data['error']}")
        if not data.get("text"):
            return
        i, out = data.get("index", 0), self.outputs[data.get("index", 0)]
        completion_tokens = data["meta_info"]["completion_tokens"]
        if out.ttft == 0.0:
            out.ttft = now - out.start_time
        else:
            new_tokens = completion_tokens - self.last_len[i]
            if new_tokens <= 0:
                return
            out.itl.extend([(now - self.last_time[i]) / new_tokens] * new_tokens)
        out.generated_text = data["text"]
        out.output_len, out.latency = completion_tokens, now - out.start_time
        self.last_time[i], self.last_len[i] = now, completion_tokens

    def finish(self, error: str = "") -> list:
        """The n outputs; all marked failed on ``error`` or when a sequence never produced a token."""
        for out in self.outputs:
            out.success = not error and out.output_len > 0
            out.error = error or ("" if out.success else "no tokens")
        return self.outputs


async def sample_prompt(session, url: str, prompt: str, prompt_len: int, args) -> list:
    """POST one n > 1 request and stream it; returns its ``args.n`` RequestFuncOutput objects."""
    payload = {"text": prompt, "stream": True,
               "sampling_params": {"n": args.n, "max_new_tokens": args.output_len, "ignore_eos": True,
                                   "temperature": 0.0}}
    tracker = SampleTracker(args.n, prompt_len, time.perf_counter())
    try:
        async with session.post(url, json=payload) as response:
            if response.status != 200:
                return tracker.finish(f"HTTP {response.status}: {await response.text()}")
            async for line in response.content:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                tracker.on_chunk(orjson.loads(line[6:]), time.perf_counter())
    except Exception as exc:  # noqa: BLE001 -- a failed request is a result, as in the stock client
        return tracker.finish(repr(exc))
    return tracker.finish()


async def run(args, prompts: list[str], prompt_lens: list[int]) -> tuple[list, float]:
    """All prompts at once; returns the flat outputs (prompt-major) and the duration in seconds."""
    import aiohttp

    url = f"http://{args.host}:{args.port}/generate"
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    async with aiohttp.ClientSession(timeout=timeout, read_bufsize=10 * 1024**2) as session:
        start = time.perf_counter()
        per_prompt = await asyncio.gather(*(sample_prompt(session, url, p, n, args)
                                            for p, n in zip(prompts, prompt_lens, strict=True)))
        duration = time.perf_counter() - start
    return [out for outs in per_prompt for out in outs], duration


def result_dict(metrics, duration: float, args) -> dict:
    """The stock client's result keys (``RENAMED`` applied) plus this run's parameters."""
    result = {RENAMED.get(k, k): v for k, v in dataclasses.asdict(metrics).items()}
    return {"backend": "sglang", "dataset_name": "parallel-sampling", "request_rate": "inf",
            "num_prompts": args.num_prompts, "n": args.n, "prompt_len": args.prompt_len,
            "output_len": args.output_len, "duration": duration, **result}


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from sglang.benchmark.datasets.common import DatasetRow, gen_prompt
    from sglang.benchmark.serving import calculate_metrics
    from sglang.benchmark.utils import get_tokenizer

    tokenizer = get_tokenizer(args.tokenizer)
    random.seed(args.seed)
    prompts = [gen_prompt(tokenizer, args.prompt_len) for _ in range(args.num_prompts)]
    prompt_lens = [len(tokenizer.encode(p)) for p in prompts]
    outputs, duration = asyncio.run(run(args, prompts, prompt_lens))
    rows = [DatasetRow(prompt=p, prompt_len=n, output_len=args.output_len)
            for p, n in zip(prompts, prompt_lens, strict=True) for _ in range(args.n)]
    metrics, _ = calculate_metrics(input_requests=rows, outputs=outputs, dur_s=duration,
                                   tokenizer=tokenizer, backend="sglang")
    result = result_dict(metrics, duration, args)
    failed = [o.error for o in outputs if not o.success]
    if failed:
        print(f"{len(failed)} of {len(outputs)} sequences failed; first error: {failed[0][:2000]}")
    with open(args.output_file, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"parallel sampling: {result['completed']} sequences, {result['output_throughput']:.1f} output tok/s,"
          f" median TTFT {result['median_ttft_ms']:.1f} ms, median ITL {result['median_itl_ms']:.2f} ms")
    return result


if __name__ == "__main__":
    main()
