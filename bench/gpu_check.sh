#!/usr/bin/env bash
# GPU check, part 1: the learner's GPU path on a bare Python + torch GPU machine (no vLLM, Ray or
# network needed). Runs bench/gpu_check_torch.py: Learner train steps (GRPO/OPD/RLAD/KEPO, ZeRO-0/2,
# fp32/bf16), the dense-teacher losses and the weight-sync bucketing on the GPU, and writes
# $OUT/gpu_check_part1.json.
#
#   here:  bash bench/gpu_wheels.sh        # DeepSpeed, pydantic, hjson as wheels into .whl/ (~6 MB)
#   there: bash bench/gpu_check.sh         # with .whl/ carried beside the checkout
#   any:   bash bench/gpu_check.sh --device cpu --quick    # the same checks on a CPU
#
# Part 2 (vLLM GPU build, NCCL/IPC weight sync into real engines, the GRPO loop on Ray) needs a
# machine with registry access: bench/gpu_check_cluster.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PROTEGE_PY:-python3}
OUT=${OUT:-bench/results/gpu_check/$(date +%Y%m%d-%H%M%S)}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  site=${PROTEGE_SITE:-/tmp/protege-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L || true
exec "$PY" bench/gpu_check_torch.py --out "$OUT" "$@"
