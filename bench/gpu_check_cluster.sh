#!/usr/bin/env bash
# GPU check, part 2: the vLLM / Ray GPU paths. Needs a machine (or cluster node) with a CUDA GPU
# and access to a package registry, since the vLLM GPU build (~10 GB with its CUDA libraries) is
# installed here; part 1 (bench/gpu_check.sh) is the one that runs on a bare torch machine.
# Results under bench/results/gpu_check/<time>/.
#
#   bash bench/gpu_check_cluster.sh                 # builds .venv-gpu (PROTEGE_PROFILE=gpu make setup), then runs
#   PROTEGE_PY=/path/to/python bash bench/gpu_check_cluster.sh   # a Python that already has the GPU stack
#   bash bench/gpu_check_cluster.sh -k ipc          # extra arguments go to pytest
#
# What runs (tests/unit/cluster/test_nccl_sync.py, `-m gpu --gpu`):
#   - CUDA IPC sync, 1 learner rank + 1 vLLM engine colocated on GPU 0 (ZeRO-2 / ZeRO-3, 0.1 MB and
#     512 MB buckets): engine log-probs == learner log-probs (1e-3, fp32 with TRITON_F32_DEFAULT=ieee)
#     after each of two pushes; push timings go to $OUT/gpu_sync.jsonl;
#   - NCCL sync (needs 2 GPUs, skipped otherwise);
#   - the full GRPO loop on one GPU through the driver (which picks the sync with pick_weight_sync).
# Then bench/pipeline_bench.py's engine comparison (vLLM vs HF, both on cuda:0, tiny student). Its
# GRPO pipeline part is skipped: its spec reserves no GPUs, so its actors would see none.
set -euo pipefail
cd "$(dirname "$0")/.."

nvidia-smi -L | grep -q GPU || { echo "gpu_check: no CUDA GPU visible (nvidia-smi -L)" >&2; exit 2; }

if [ -n "${PROTEGE_PY:-}" ]; then
  PY=$PROTEGE_PY
else
  # A separate venv: the CPU build's torch (2.13.0+cpu) satisfies torch==2.13.0, so reusing .venv
  # would keep CPU torch. Needs network access to PyPI (about 2 minutes, ~10 GB).
  export PROTEGE_VENV=${PROTEGE_VENV:-.venv-gpu}
  PROTEGE_PROFILE=gpu make setup
  PY=$PROTEGE_VENV/bin/python
fi
"$PY" - <<'EOF'
import torch, vllm, deepspeed, ray
assert torch.cuda.is_available(), "torch has no CUDA (CPU build?)"
print("gpu_check:", torch.cuda.get_device_name(0), "x", torch.cuda.device_count(),
      "| torch", torch.__version__, "| vllm", vllm.__version__, "| deepspeed", deepspeed.__version__, "| ray", ray.__version__)
EOF

# GPU environment, overriding the CPU defaults tests/conftest.py and the Makefile would set.
export DS_ACCELERATOR=cuda
export VLLM_ENABLE_V1_MULTIPROCESSING=1          # vLLM's GPU default: engine core in its own process
export VLLM_ALLOW_INSECURE_SERIALIZATION=1       # CUDA IPC handles cross that process boundary pickled
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions_gpu}
unset VLLM_CPU_KVCACHE_SPACE

OUT=${OUT:-bench/results/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PROTEGE_BENCH_OUT=$OUT
status=0

echo "== pytest -m gpu --gpu (log: $OUT/pytest.log)"
"$PY" -m pytest -m gpu --gpu tests/ -q -rA --timeout=1800 -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest.log" \
  || status=$?

echo "== engine bench: vLLM vs HF on the GPU (tiny student)"
[ -d models/tiny/student ] || "$PY" -m protege.cli models tiny models/tiny
"$PY" bench/pipeline_bench.py --skip-pipeline --no-model --out "$OUT" 2>&1 | tee "$OUT/pipeline_bench.log" \
  || status=$((status ? status : 1))

echo "== push timings ($OUT/gpu_sync.jsonl)"
[ -f "$OUT/gpu_sync.jsonl" ] && cat "$OUT/gpu_sync.jsonl" || echo "(none: the GPU sync tests did not get to a push)"
echo "== gpu_check done, status $status, results in $OUT"
exit $status
