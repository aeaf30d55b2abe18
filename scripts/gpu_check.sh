#!/usr/bin/env bash
# One prepared GPU check (issue #9) for a single H100/H200 with a stock CUDA PyTorch image (torch, transformers,
# accelerate, peft; trl/datasets/deepspeed/vllm not needed). Random-init models from configs: no downloads.
#
#   scripts/gpu_check.sh [bench.gpu_check options]     e.g. --batch 2, --seq 2048, --peak-tflops 989
#   scripts/gpu_check.sh --dry-run                      same code paths on CPU, tiny models (< 1 min)
#
# Prints the environment (date, nvidia-smi, torch/transformers versions), then bench/gpu_check.py's tables:
# (a) distill-step tokens/s and MFU (sft / live teacher / cached top-k), (b) kd_loss vs naive KL peak memory,
# (c) generation tokens/s (raw generate vs align-distill's transformers backend), (d) fused LM-head JSD from hidden
# states: fused_kd_loss vs the logits path vs naive, and TRL's _chunked_divergence_loss / Liger's LigerFusedLinearJSD
# when trl / liger-kernel are importable (else the row says skipped). JSON goes to $OUT/gpu_check.json
# when OUT is set (or --json PATH). The whole run is capped at 480 s (exit 124 when the cap is hit; the JSON
# keeps every section that finished).
# Environment: PYTHON (python), GPU_CHECK_TIMEOUT (480).
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
LIMIT=${GPU_CHECK_TIMEOUT:-480}

echo "== date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   host: $(hostname)   commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit --format=csv || true
    nvidia-smi | sed -n '3p' || true # the line with the driver and CUDA versions
else
    echo "nvidia-smi: not found"
fi
"$PYTHON" - <<'PY'
import importlib.util
import torch, transformers
print(f"python torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
      f"transformers {transformers.__version__}, cuda available: {torch.cuda.is_available()}")
for name in ("accelerate", "peft", "trl", "liger_kernel", "datasets", "pyarrow"):
    print(f"  {name}: {'installed' if importlib.util.find_spec(name) else 'not installed'}")
PY

status=0
timeout "$LIMIT" "$PYTHON" -m bench.gpu_check "$@" || status=$?
if [ "$status" -eq 124 ]; then
    echo "gpu_check.sh: stopped at the ${LIMIT} s limit; finished sections are in the JSON (if OUT/--json was set)" >&2
elif [ "$status" -ne 0 ]; then
    echo "gpu_check.sh: bench.gpu_check exited with status $status" >&2
fi
exit "$status"
