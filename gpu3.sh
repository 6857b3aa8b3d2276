#!/bin/bash
source .devsite/prelude.sh
python -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -1
python scripts/make_model_dir.py --shape llama-3-8b --out /tmp/m8 >/dev/null
R=$OUT/r; mkdir -p $R
timeout 130 python -m pytest -q -x tests/test_decode_step.py tests/test_kernels.py 2>&1 | tail -3
timeout 120 python scripts/bench_kernel.py --quick --out $R/kernel/kernel_quick.json 2>&1 | tail -12
timeout 330 python scripts/bench_serving.py --model-dir /tmp/m8 --workload short --backends packinfer,packinfer:eager --baseline packinfer --verify --packinfer-env PACKINFER_LOG_EVERY=16 --out-dir $R/short 2>&1 | grep -v "waiting for" | tail -8
pkill -f sglang.launch_server
grep -h "packinfer: \|Traceback\|Error" $R/short/server*.log | tail -12
cd $R && tar czf $OUT/logs3.tgz .
