#!/usr/bin/env bash
# The TRL peer's own virtualenv for bench/peer_trl.py (not a project dependency).
#   bash bench/peer_trl_setup.sh            # creates / reuses .cache/peer_trl_venv (git-ignored)
#   PEER_TRL_VENV=/path PEER_TRL_VERSION=1.16.0 bash bench/peer_trl_setup.sh
# torch, transformers, accelerate, tokenizers and safetensors are pinned to the versions in the
# project's .venv, so both sides of the comparison run the same kernels and model code.
# Idempotent: a stamp keyed on those versions and this script skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT_PY=${PROTEGE_PY:-.venv/bin/python}
VENV=${PEER_TRL_VENV:-.cache/peer_trl_venv}
TRL=${PEER_TRL_VERSION:-1.16.0}

pins=$("$PROJECT_PY" - <<'PY'
from importlib import metadata
out = []
for d in ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "numpy", "jinja2"):
    try:
        out.append(f"{d}=={metadata.version(d)}")
    except metadata.PackageNotFoundError:
        pass
print(" ".join(out))
PY
)
key=$(echo "trl==$TRL $pins" | cat - "$0" | sha256sum | cut -c1-16)
stamp="$VENV/.peer-trl-$key"
if [ -f "$stamp" ]; then echo "$VENV"; exit 0; fi

echo "[peer_trl_setup] venv=$VENV trl==$TRL $pins" >&2
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip >&2
torch_pin=$(tr ' ' '\n' <<<"$pins" | grep '^torch==')
# torch first: the +cpu build (local wheel or the PyTorch CPU index), so nothing pulls the CUDA one.
$PIP install -q "$torch_pin" >&2 || $PIP install -q "$torch_pin" --index-url https://download.pytorch.org/whl/cpu >&2
# shellcheck disable=SC2086
$PIP install -q "trl==$TRL" $pins >&2
"$VENV/bin/python" - <<PY >&2
import torch, transformers, trl
want = dict(p.split("==") for p in "$pins".split())
got = {"torch": torch.__version__, "transformers": transformers.__version__}
bad = {k: (got[k], want[k]) for k in got if got[k] != want[k]}
assert not bad, f"version mismatch with the project venv: {bad}"
assert trl.__version__ == "$TRL", trl.__version__
print("[peer_trl_setup] ok: trl", trl.__version__, "torch", torch.__version__, "transformers", transformers.__version__)
PY
rm -f "$VENV"/.peer-trl-*
touch "$stamp"
echo "$VENV"
