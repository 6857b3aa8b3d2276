#!/bin/bash
source .devsite/prelude.sh
python -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -1
python scripts/make_model_dir.py --shape llama-3-8b --out /tmp/m8 >/dev/null
R=$OUT/r; mkdir -p $R
timeout 575 python scripts/bench_serving.py --model-dir /tmp/m8 --workload anchors --backends packinfer,flashinfer,triton --baseline flashinfer --packinfer-env PACKINFER_LOG_EVERY=128 --out-dir $R/anchors 2>&1 | grep -v "waiting for" | tail -8
pkill -f sglang.launch_server
grep -h "packinfer: \|Traceback" $R/anchors/server*.log | tail -5
cd $R && tar czf $OUT/logs4.tgz .
