"""The product's tools: the kernel and serving benchmarks and what they need, run from the
repository root as modules (``python -m scripts.<tool>``).

Tools:

- :mod:`.bench_kernel`: decode attention for one layer, ours against SGLang's Triton decode,
  FlashInfer and FA2 (``python -m scripts.bench_kernel --quick``); its cases
  (:mod:`.kernel_cases`), baselines (:mod:`.kernel_baselines`) and report (:mod:`.kernel_report`,
  also ``python -m scripts.kernel_report`` to rewrite result JSONs).
- :mod:`.bench_serving`: the end-to-end serving benchmark, one SGLang server per attention backend
  (``python -m scripts.bench_serving --model-dir ... --quick``); its workloads
  (:mod:`.serving_workloads`), processes (:mod:`.serving_procs`), report (:mod:`.serving_report`),
  client runner (:mod:`.serving_client`) and parallel-sampling client (:mod:`.serving_parallel`).
- :mod:`.make_model_dir`: a weightless model directory for ``--load-format dummy``
  (``python -m scripts.make_model_dir --shape llama-3-8b --out out/models/llama-3-8b``).
- :mod:`.steady_decode`: steady decode rates and the backend's counters of committed serving runs
  (``python -m scripts.steady_decode RUN.json EXCERPTS.txt --out X.json``).

Lab tools (profilers and studies, not the product) live in :mod:`scripts.lab`.
"""
