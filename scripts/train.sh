#!/usr/bin/env bash
# Launch `align-distill train METHOD --config RECIPE [--key value ...]` on one or many nodes.
#
#   scripts/train.sh METHOD RECIPE [--key value ...]     RECIPE: a YAML file, or a shipped recipe's name (dckd/cache)
#
# Run the same command on every node; only NODE_RANK differs. Environment:
#   LAUNCHER        accelerate (default) | deepspeed | torchrun
#   NNODES          number of nodes (1)
#   NPROC_PER_NODE  processes (GPUs) per node (number of visible GPUs, else 1)
#   NODE_RANK       this node's rank, 0..NNODES-1 (0)
#   MASTER_ADDR     address of node 0 (127.0.0.1)
#   MASTER_PORT     free TCP port on node 0 (29500)
#   ZERO            ddp | zero2 | zero3 | zero3_offload | fsdp2 (zero3): picks the installed package's
#                   configs/accelerate/*.yaml and configs/deepspeed/*.json; zero3_offload uses the zero3 accelerate
#                   file with the offload JSON; fsdp2 (PyTorch FSDP2, no DeepSpeed) needs LAUNCHER=accelerate.
#                   With accelerate, --num_processes and an absolute --deepspeed_config_file are always passed:
#                   the shipped accelerate files hold no process count, and their JSON path is checkout-relative
#   ACCELERATE_CONFIG, DS_CONFIG   explicit files (or names: deepspeed/zero3.json) instead of the ZERO choice
#                   (DS_CONFIG=none: no DeepSpeed)
#   PYTHON          the interpreter that has align_distill (python)
#   DRY_RUN=1       print the command instead of running it
#
# Examples:
#   NPROC_PER_NODE=8 scripts/train.sh dckd dckd/live --output_dir runs/dckd
#   NNODES=2 NODE_RANK=$RANK MASTER_ADDR=node0 LAUNCHER=deepspeed scripts/train.sh adpa align_distill/configs/adpa/real.yaml
#   # the teacher on its own GPU(s) behind vLLM, the student trained against it (docs/teachers.md):
#   CUDA_VISIBLE_DEVICES=7 python -m vllm.entrypoints.openai.api_server --model runs/teacher_dpo \
#     --served-model-name teacher --port 8000 --max-logprobs 100 &
#   CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6 NPROC_PER_NODE=7 scripts/train.sh dckd dckd/server \
#     --teacher_server_url http://127.0.0.1:8000/v1
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)  # the checkout: its configs when align_distill is not importable
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

# A config argument: an existing file as given, else a shipped recipe / launcher file by name (align_distill.recipes).
resolve() {
    [ -f "$1" ] && { printf '%s\n' "$1"; return 0; }
    "$PYTHON" -c 'import sys
try:
    from align_distill.recipes import resolve_config
except ImportError as error:
    sys.exit(f"{sys.argv[2]}: {sys.argv[1]} not found (and align_distill is not importable: {error})")
from align_distill.errors import ConfigError
try:
    print(resolve_config(sys.argv[1]))
except ConfigError as error:
    sys.exit(f"{sys.argv[2]}: {error}")' "$1" train.sh
}

if [ $# -lt 2 ]; then
    sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
METHOD=$1
RECIPE=$(resolve "$2") || exit 2
shift 2

LAUNCHER=${LAUNCHER:-accelerate}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
ZERO=${ZERO:-zero3}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
# the launcher files shipped in the package (where python imports it from), else the checkout's
CONFIGS=$("$PYTHON" -c 'import align_distill, pathlib; print(pathlib.Path(align_distill.__file__).parent / "configs")' \
    2>/dev/null) || CONFIGS=$REPO/align_distill/configs
case "$ZERO" in
    ddp) ACC_DEFAULT=ddp; DS_DEFAULT=none ;;
    zero2) ACC_DEFAULT=zero2; DS_DEFAULT=$CONFIGS/deepspeed/zero2.json ;;
    zero3) ACC_DEFAULT=zero3; DS_DEFAULT=$CONFIGS/deepspeed/zero3.json ;;
    zero3_offload) ACC_DEFAULT=zero3; DS_DEFAULT=$CONFIGS/deepspeed/zero3_offload.json ;;
    fsdp2) ACC_DEFAULT=fsdp2; DS_DEFAULT=none ;;
    *) echo "train.sh: ZERO must be ddp, zero2, zero3, zero3_offload or fsdp2; got $ZERO" >&2; exit 2 ;;
esac
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$CONFIGS/accelerate/$ACC_DEFAULT.yaml}
ACCELERATE_CONFIG=$(resolve "$ACCELERATE_CONFIG") || exit 2
DS_CONFIG=${DS_CONFIG:-$DS_DEFAULT}
[ "$DS_CONFIG" = none ] || DS_CONFIG=$(resolve "$DS_CONFIG") || exit 2
TRAIN=(-m align_distill.cli train "$METHOD" --config "$RECIPE")

case "$LAUNCHER" in
    accelerate)
        CMD=(accelerate launch --config_file "$ACCELERATE_CONFIG"
            --num_machines "$NNODES" --num_processes $((NNODES * NPROC_PER_NODE)) --machine_rank "$NODE_RANK"
            --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT")
        # A DeepSpeed accelerate file names its JSON relative to a checkout's root: pass the resolved, absolute
        # one (it replaces the file's). Not for a file that carries the DeepSpeed settings itself (zero_stage...):
        # accelerate refuses both at once.
        ACC_TYPE=$(sed -n 's/^distributed_type:[[:space:]]*//p' "$ACCELERATE_CONFIG" | tr -d "\"' \r")
        if [ "$ACC_TYPE" = DEEPSPEED ] && [ "$DS_CONFIG" != none ] \
            && ! grep -Eq '^[[:space:]]+zero_stage:' "$ACCELERATE_CONFIG"; then
            CMD+=(--deepspeed_config_file "$(cd "$(dirname "$DS_CONFIG")" && pwd)/$(basename "$DS_CONFIG")")
        fi
        CMD+=("${TRAIN[@]}" "$@")
        ;;
    deepspeed)
        [ "$ZERO" != fsdp2 ] || { echo "train.sh: ZERO=fsdp2 needs LAUNCHER=accelerate" >&2; exit 2; }
        [ "$DS_CONFIG" != none ] || { echo "train.sh: LAUNCHER=deepspeed needs a DeepSpeed config" >&2; exit 2; }
        # One hostfile entry per node; --no_ssh: every node starts its own processes (like torchrun), no pdsh.
        HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/align-distill-hostfile.XXXXXX")
        trap 'rm -f "$HOSTFILE"' EXIT
        for ((node = 0; node < NNODES; node++)); do echo "node-$node slots=$NPROC_PER_NODE"; done > "$HOSTFILE"
        CMD=(deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK"
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank
            --module align_distill.cli train "$METHOD" --config "$RECIPE" --deepspeed "$DS_CONFIG" "$@")
        ;;
    torchrun)
        [ "$ZERO" != fsdp2 ] || { echo "train.sh: ZERO=fsdp2 needs LAUNCHER=accelerate" >&2; exit 2; }
        CMD=(torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --node_rank "$NODE_RANK"
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${TRAIN[@]}")
        [ "$DS_CONFIG" = none ] || CMD+=(--deepspeed "$DS_CONFIG")
        CMD+=("$@")
        ;;
    *)
        echo "train.sh: LAUNCHER must be accelerate, deepspeed or torchrun; got $LAUNCHER" >&2
        exit 2
        ;;
esac

if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
"${CMD[@]}"  # not exec: the EXIT trap removes the deepspeed hostfile
