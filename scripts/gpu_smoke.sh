#!/usr/bin/env bash
# GPU smoke test: serve a dummy-weight model with packinfer in verification mode (eager decode, so
# every decode step runs the packed kernel and SGLang's Triton decode side by side) and drive it
# with SGLang's generated-shared-prefix benchmark. Writes server.log and the client's JSONL to $OUT.
#
#   SHAPE=tiny|llama-3-8b  GROUPS=2 PER_GROUP=8 SYSTEM=512 QUESTION=16 OUTPUT=32  bash scripts/gpu_smoke.sh
set -uo pipefail
OUT=${OUT:-/tmp/packinfer-smoke}; mkdir -p "$OUT"
export SGLANG_PLUGINS=${SGLANG_PLUGINS:-packinfer}  # only ours: the archive leaves out the smg plugins' deps
SHAPE=${SHAPE:-tiny}; PORT=${PORT:-30111}; MODEL=/tmp/packinfer-models/$SHAPE
python scripts/make_model_dir.py --shape "$SHAPE" --out "$MODEL" || exit 1
PACKINFER_VERIFY=${VERIFY:-1} PACKINFER_LOG_EVERY=${LOG_EVERY:-20} PACKINFER_MIN_PREFIX_TOKENS=${MIN_PREFIX:-64} \
  setsid python -m sglang.launch_server --model-path "$MODEL" --tokenizer-path "$MODEL/tokenizer" \
  --load-format dummy --attention-backend packinfer --radix-cache-backend packinfer \
  --cuda-graph-backend-decode disabled --cuda-graph-backend-prefill disabled \
  --host 127.0.0.1 --port "$PORT" ${EXTRA_ARGS:-} > "$OUT/server_$SHAPE.log" 2>&1 &
SPID=$!
up=0
for _ in $(seq 1 ${WAIT_S:-240}); do
  curl -sf "127.0.0.1:$PORT/health" >/dev/null && { up=1; break; }
  kill -0 $SPID 2>/dev/null || break
  sleep 1
done
echo "server up: $up"
rc=1
if [ $up = 1 ]; then
  python -m sglang.benchmark.serving --backend sglang --host 127.0.0.1 --port "$PORT" \
    --dataset-name generated-shared-prefix --gsp-num-groups ${GROUPS:-2} --gsp-prompts-per-group ${PER_GROUP:-8} \
    --gsp-system-prompt-len ${SYSTEM:-512} --gsp-question-len ${QUESTION:-16} --gsp-output-len ${OUTPUT:-32} \
    --tokenizer "$MODEL/tokenizer" --output-file "$OUT/smoke_$SHAPE.jsonl" --disable-tqdm 2>&1 | tail -25
  rc=${PIPESTATUS[0]}
fi
kill -TERM -- -$SPID 2>/dev/null; sleep 3; kill -KILL -- -$SPID 2>/dev/null
echo "--- server log (packinfer lines, errors)"
grep -E "packinfer|Traceback|Error|error" "$OUT/server_$SHAPE.log" | grep -v "Warning" | tail -25
grep -q "Traceback" "$OUT/server_$SHAPE.log" && { echo "--- traceback"; grep -A30 Traceback "$OUT/server_$SHAPE.log" | tail -40; rc=1; }
echo "smoke rc=$rc"
exit $rc
