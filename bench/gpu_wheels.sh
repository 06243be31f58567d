#!/usr/bin/env bash
# The wheels the GPU check's first part (bench/gpu_check_torch.py) needs on a stock PyTorch GPU
# image that has torch, transformers, tokenizers and safetensors but no DeepSpeed or pydantic, and
# no network: downloaded here into .whl/ (git-ignored), then carried to that machine (~7 MB).
#
#   bash bench/gpu_wheels.sh                  # for Python 3.12 (PYVER=3.11 for another)
#   # there: python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#   #        PYTHONPATH=/tmp/site python3 bench/gpu_check_torch.py --out $OUT
#
# DeepSpeed is published as a source archive only; it is built here into a pure-Python wheel
# (DS_BUILD_OPS=0: its CUDA ops JIT-build on first use, and the check needs none of them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PROTEGE_PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
OUT=${WHEELS_DIR:-.whl}
mkdir -p "$OUT"
# Same versions as requirements/ pins and the CPU venv, so the check runs what users run.
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT" "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic_core)" "annotated-types==$(ver annotated-types)" \
  "typing-inspection==$(ver typing-inspection)" "hjson==$(ver hjson)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "deepspeed==$(ver deepspeed)"
ls -1 "$OUT"
du -sh "$OUT"
