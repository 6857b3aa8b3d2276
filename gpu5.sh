#!/bin/bash
source .devsite/prelude.sh
python -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -1
timeout 540 python scripts/bench_kernel.py --full --out-dir $OUT/k 2>&1 | grep -v Warning | tail -70
