#!/usr/bin/env bash
# The quickstart: train a prompter by the recipe that wins the standard benchmark (guidance search, SFT, RL that
# keeps its best round) on a starter set, evaluate it on 48 held-out prompts, use it in LangChain and DSPy.
# Installs everything first (idempotent).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 LITELLM_LOCAL_MODEL_COST_MAP=True
exec .venv/bin/python examples/quickstart.py "$@"
