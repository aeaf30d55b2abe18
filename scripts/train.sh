#!/usr/bin/env bash
# Launch `align-distill train METHOD --config RECIPE [--key value ...]` on one or many nodes.
#
#   scripts/train.sh METHOD RECIPE.yaml [--key value ...]
#
# Run the same command on every node; only NODE_RANK differs. Environment:
#   LAUNCHER        accelerate (default) | deepspeed | torchrun
#   NNODES          number of nodes (1)
#   NPROC_PER_NODE  processes (GPUs) per node (number of visible GPUs, else 1)
#   NODE_RANK       this node's rank, 0..NNODES-1 (0)
#   MASTER_ADDR     address of node 0 (127.0.0.1)
#   MASTER_PORT     free TCP port on node 0 (29500)
#   ZERO            ddp | zero2 | zero3 | zero3_offload (zero3): picks configs/accelerate/*.yaml and
#                   configs/deepspeed/*.json; zero3_offload uses the zero3 accelerate file with the offload JSON
#   ACCELERATE_CONFIG, DS_CONFIG   explicit config files instead of the ZERO choice (DS_CONFIG=none: no DeepSpeed)
#   DRY_RUN=1       print the command instead of running it
#
# Examples:
#   NPROC_PER_NODE=8 scripts/train.sh dckd configs/dckd_live.yaml --output_dir runs/dckd
#   NNODES=2 NODE_RANK=$RANK MASTER_ADDR=node0 LAUNCHER=deepspeed scripts/train.sh adpa configs/adpa_real.yaml
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)  # default config files live here; RECIPE is relative to the caller

if [ $# -lt 2 ]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
METHOD=$1
RECIPE=$2
shift 2
[ -f "$RECIPE" ] || { echo "train.sh: recipe $RECIPE not found" >&2; exit 2; }

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
case "$ZERO" in
    ddp) ACC_DEFAULT=ddp; DS_DEFAULT=none ;;
    zero2) ACC_DEFAULT=zero2; DS_DEFAULT=$REPO/configs/deepspeed/zero2.json ;;
    zero3) ACC_DEFAULT=zero3; DS_DEFAULT=$REPO/configs/deepspeed/zero3.json ;;
    zero3_offload) ACC_DEFAULT=zero3; DS_DEFAULT=$REPO/configs/deepspeed/zero3_offload.json ;;
    *) echo "train.sh: ZERO must be ddp, zero2, zero3 or zero3_offload; got $ZERO" >&2; exit 2 ;;
esac
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$REPO/configs/accelerate/$ACC_DEFAULT.yaml}
DS_CONFIG=${DS_CONFIG:-$DS_DEFAULT}
TRAIN=(-m align_distill.cli train "$METHOD" --config "$RECIPE")

case "$LAUNCHER" in
    accelerate)
        CMD=(accelerate launch --config_file "$ACCELERATE_CONFIG"
            --num_machines "$NNODES" --num_processes $((NNODES * NPROC_PER_NODE)) --machine_rank "$NODE_RANK"
            --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT")
        # the accelerate file names a DeepSpeed JSON; an explicit DS_CONFIG replaces it
        if [ "$ZERO" != ddp ] && [ "$DS_CONFIG" != none ]; then
            CMD+=(--deepspeed_config_file "$DS_CONFIG")
        fi
        CMD+=("${TRAIN[@]}" "$@")
        ;;
    deepspeed)
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
