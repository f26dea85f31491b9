#!/usr/bin/env bash
# Run the whole test suite (unit tests on tiny models + end-to-end tests on the packaged models).
# Installs everything first (idempotent; a no-op on a second run).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 LITELLM_LOCAL_MODEL_COST_MAP=True
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/ruff check alignpro_plugins trainers tests benchmarks examples
.venv/bin/ruff format --check alignpro_plugins trainers tests benchmarks examples
.venv/bin/mypy
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
