# Sourced by run_train.sh and tests/run.sh: use an environment that has titan_dsv4 installed, or make one.
# PYTHON overrides the interpreter; otherwise ./.venv is created on first use (CPU torch 2.13.0 on a
# machine without CUDA; the default torch wheel elsewhere).
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then
  :
elif [ -x "$_root/.venv/bin/python" ] && "$_root/.venv/bin/python" -c "import titan_dsv4" >/dev/null 2>&1; then
  PYTHON="$_root/.venv/bin/python"
else
  echo "[titan_dsv4] creating $_root/.venv and installing titan_dsv4 (first run only)" >&2
  python3 -m venv "$_root/.venv"
  PYTHON="$_root/.venv/bin/python"
  "$PYTHON" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"  # CPU build; avoids a multi-GB CUDA download
  fi
  "$PYTHON" -m pip install --quiet -e "$_root[${TITAN_DSV4_EXTRAS:-test}]"
fi
export PYTHON
