#!/usr/bin/env bash
# One device-tool call for a session that is lent a GPU: build the extension with CUDA,
# run the GPU tests, then the full benchmark. Results land in $OUT (copy them to
# bench/results/ and commit them with the card's name and date).
#   run(command="bash bench/gpu_session.sh", timeout_s=600)
set -uo pipefail
OUT=${OUT:-/tmp/fusedaccum-gpu}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/gpu_session.log"; }
log "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader) $(date -u +%F)"
log "build (ahead of time, with CUDA)"
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$OUT/gpu_session.log"
python -m fusedaccum info 2>&1 | tee -a "$OUT/gpu_session.log"
log "op tests on the GPU (cuda and triton backends vs the reference)"
python -m pytest -q -x tests/test_ops.py tests/test_native_library.py tests/test_triton_library.py \
    2>&1 | tail -15 | tee -a "$OUT/gpu_session.log"
for backend in cuda triton; do
  log "wrapper suite, backend=$backend"
  FUSEDACCUM_TEST_BACKEND=$backend timeout 240 python -m pytest -q tests/test_accumulator.py \
      tests/test_amp.py tests/test_state_dict.py tests/test_errors.py 2>&1 | tail -15 \
      | tee -a "$OUT/gpu_session.log"
done
log "benchmark"
timeout 300 python -m fusedaccum bench --no-progress --out "$OUT" 2>&1 | tail -40 \
    | tee -a "$OUT/gpu_session.log"
