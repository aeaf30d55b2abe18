#!/usr/bin/env bash
# Run one data-generation job (`align-distill generate JOB --config JOB.yaml`) across nodes and GPUs.
#
#   scripts/generate.sh JOB CONFIG [--key value ...]          JOB: sample | rollout | signals | rank | pairs
#   CONFIG: a YAML file, or a shipped recipe's name (dckd/signals; `align-distill recipes list`)
#
# Run the same command on every node; only NODE_RANK differs. Every engine writes its own part of ONE store
# (the job's output_dir, which must be on a filesystem all nodes share): engine i of node r is part
# r * ENGINES_PER_NODE + i of NNODES * ENGINES_PER_NODE. Parts are disjoint, contiguous slices of the input and
# resume independently; readers (`load_store`, training) see the whole store once every part is complete.
# Environment:
#   NNODES            number of nodes (1)
#   NODE_RANK         this node's rank, 0..NNODES-1 (0)
#   TP                vLLM tensor_parallel_size of each engine (unset: the config's value)
#   GPU_MEMORY_UTILIZATION  vLLM gpu_memory_utilization of each engine (unset: the config's value)
#                     TP and GPU_MEMORY_UTILIZATION are vLLM-only: they go to the job's models (each teacher of
#                     `signals`, the judge of `rank`) whose backend is vllm, after the command-line overrides
#   ENGINES_PER_NODE  engines started on this node, each on its own TP GPUs (1)
#   PYTHON            the interpreter that has align_distill (python)
#   DRY_RUN=1         print the commands instead of running them
#
# Examples:
#   NNODES=4 NODE_RANK=$RANK TP=8 scripts/generate.sh rollout adpa/rollout
#   ENGINES_PER_NODE=4 TP=2 scripts/generate.sh signals align_distill/configs/dckd/signals.yaml   # 4 engines x 2 GPUs
#   # the teacher on a vLLM server (docs/teachers.md): start it, then compute the signals through it
#   python -m vllm.entrypoints.openai.api_server --model runs/teacher_dpo --served-model-name teacher \
#     --port 8000 --max-logprobs 100 &
#   scripts/generate.sh signals dckd/signals --teachers.0.backend openai --teachers.0.model teacher \
#     --teachers.0.backend_kwargs '{"base_url": "http://127.0.0.1:8000/v1"}'
set -euo pipefail
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ $# -lt 2 ]; then
    sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
JOB=$1
CONFIG=$2
shift 2
if [ ! -f "$CONFIG" ]; then  # a shipped recipe by name (align_distill.recipes)
    CONFIG=$("$PYTHON" -c 'import sys
try:
    from align_distill.recipes import resolve_config
except ImportError as error:
    sys.exit(f"generate.sh: config {sys.argv[1]} not found (and align_distill is not importable: {error})")
from align_distill.errors import ConfigError
try:
    print(resolve_config(sys.argv[1]))
except ConfigError as error:
    sys.exit(f"generate.sh: {error}")' "$CONFIG") || exit 2
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
ENGINES_PER_NODE=${ENGINES_PER_NODE:-1}
NUM_PARTS=$((NNODES * ENGINES_PER_NODE))

# vLLM-only engine arguments, each to the models of the job whose backend is vllm (a transformers or openai model
# would reject them): one model for sample/rollout, the judge for rank, every teacher of signals. The backends are
# the config's with the command-line overrides on top (`--teachers.1.backend vllm`).
case "$JOB" in
    sample | rollout | signals | rank | pairs) ;;
    *) echo "generate.sh: unknown job $JOB (sample, rollout, signals, rank, pairs)" >&2; exit 2 ;;
esac
VLLM_ARGS=()
if [ -n "${TP:-}${GPU_MEMORY_UTILIZATION:-}" ] && [ "$JOB" != pairs ]; then  # pairs: no model
    VLLM_OUT=$("$PYTHON" -c 'import sys
import yaml
job, path, tp, memory, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
with open(path) as handle:
    data = yaml.safe_load(handle) or {}
try:  # the command line can change a backend; a malformed override is left to align-distill to report
    from align_distill.configuration import merge, parse_overrides
    data = merge(data, parse_overrides(overrides))
except Exception:
    pass
def spec(value):  # `teacher: path` is {model: path}
    return value if isinstance(value, dict) else {"model": value}
if job in ("sample", "rollout"):
    models = [("", data)]
elif job == "rank":
    models = [("judge.", spec(data.get("judge") or {}))]
else:
    models = [(f"teachers.{i}.", spec(t)) for i, t in enumerate(data.get("teachers") or [])]
for prefix, model in models:
    backend = model.get("backend") or "transformers"
    if backend != "vllm":
        print(f"generate.sh: {prefix or job + chr(32)}backend is {backend}: TP / GPU_MEMORY_UTILIZATION not passed",
              file=sys.stderr)
        continue
    for key, value in (("tensor_parallel_size", tp), ("gpu_memory_utilization", memory)):
        if value:
            print(f"--{prefix}backend_kwargs.{key}")
            print(value)' "$JOB" "$CONFIG" "${TP:-}" "${GPU_MEMORY_UTILIZATION:-}" "$@") || exit 2
    [ -z "$VLLM_OUT" ] || mapfile -t VLLM_ARGS <<< "$VLLM_OUT"
fi

run() {
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "$@"
        echo
    else
        "$@"
    fi
}

pids=()
for ((engine = 0; engine < ENGINES_PER_NODE; engine++)); do
    PART=$((NODE_RANK * ENGINES_PER_NODE + engine))
    CMD=(align-distill generate "$JOB" --config "$CONFIG" --part "$PART" --num-parts "$NUM_PARTS" ${VLLM_ARGS[@]+"${VLLM_ARGS[@]}"} "$@")
    if [ "$ENGINES_PER_NODE" -gt 1 ]; then
        # engine i sees GPUs [i*TP, (i+1)*TP)
        first=$((engine * ${TP:-1}))
        GPUS=$(seq -s, "$first" $((first + ${TP:-1} - 1)))
        CMD=(env CUDA_VISIBLE_DEVICES="$GPUS" "${CMD[@]}")
        if [ "${DRY_RUN:-0}" = 1 ]; then
            run "${CMD[@]}"
        else
            "${CMD[@]}" &
            pids+=($!)
        fi
    else
        run "${CMD[@]}"
    fi
done
status=0
for pid in ${pids[@]+"${pids[@]}"}; do
    wait "$pid" || status=$?
done
exit $status
