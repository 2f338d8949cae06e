#!/usr/bin/env bash
# Runs ON the lent GPU machine, after scripts/device_setup.sh has installed what scripts/device_stage.sh
# staged here (wheels, mirror, NLTK data, and the GGUF or, for random-weight models, the tokenizer):
#   LIMIT_S=540 bash scripts/device_compare.sh RUN_ID METHODS [overrides...]
#   CMD=sweep ... --grid-file F   runs `harness sweep` instead (arms with their own settings)
#   SEED_BASELINES=1 ...   starts from the project's committed baselines/, as `make compare` would
#                          (default: an empty baseline cache, so the base is evaluated too)
# Progress bars are dropped from the log; a [harness] line printed after a bar's last update
# (no newline between them) is split off first, so it is kept.
# Results accumulate in /tmp/hr (kept while the machine stays warm, so a second call with the same
# RUN_ID resumes). The compare is stopped after LIMIT_S seconds (default 540, under the device's
# 10-minute call limit), and every call, finished or not, copies the run's report files to $OUT,
# the baselines the run wrote (/tmp/hb) as baselines.tgz, the parallel jobs' logs, and the log.
set -uo pipefail
source /tmp/hd/env.sh
export HARNESS_GGUF="$HD_GGUF" HARNESS_CACHE=/tmp/hc HARNESS_MIRROR="$HD_MIRROR"
run_id="$1"; methods="$2"; shift 2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
mkdir -p /tmp/hb
[ "${SEED_BASELINES:-0}" = 1 ] && cp -rn baselines/. /tmp/hb/ && rm -f /tmp/hb/README.md
start=$(date +%s)
timeout "${LIMIT_S:-540}" python3 -m harness "${CMD:-compare}" --task finance --methods "$methods" --profile full \
  --run-id "$run_id" --results-dir /tmp/hr --work-dir /tmp/hw --baselines-dir /tmp/hb "$@" 2>&1 \
  | tr '\r' '\n' | sed -u 's/\[harness /\n[harness /g' \
  | grep --line-buffered -v -E "it/s\]|s/it\]|examples/s\]" >> /tmp/hr-$run_id.log
rc=${PIPESTATUS[0]}
echo "this call: $(( $(date +%s) - start ))s, exit $rc" | tee -a /tmp/hr-$run_id.log
grep -E "^\[harness|Error|error|Traceback" /tmp/hr-$run_id.log | tail -40
[ -d "/tmp/hr/finance/$run_id" ] && tar czf "$OUT/run.tgz" -C /tmp/hr/finance "$run_id"
[ -d /tmp/hb ] && tar czf "$OUT/baselines.tgz" -C /tmp/hb .
[ -d "/tmp/hw/finance/$run_id/jobs" ] && tar czf "$OUT/jobs.tgz" -C "/tmp/hw/finance/$run_id" jobs
tail -c 200000 /tmp/hr-$run_id.log > "$OUT/log.txt"
exit $rc
