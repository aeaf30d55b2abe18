"""Several processes on a machine without GPUs (tests, CI, laptops): make them one gloo process group.

Why this exists: `accelerate` picks a distributed backend from the device it finds. On a CPU-only box a process
started by `torchrun` / `deepspeed` / `accelerate launch` gets *no* backend unless it runs with `cpu=True`, and
`cpu=True` switches DeepSpeed off. The trainer then reports `num_processes == 1` and every rank trains alone on the
whole dataset, without an error. Creating a gloo `PartialState` first does not help: `TrainingArguments` resets the
state and builds its own one.

`init_cpu_process_group()` closes that gap at its source: in a launched process with no accelerator, accelerate's
backend resolution answers gloo (for DeepSpeed: gloo under DeepSpeed's communication layer; otherwise DDP over gloo,
accelerate's `MULTI_CPU`). Call it before the training arguments are created. On GPU machines and in single
processes it does nothing, so the same command line runs everywhere.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import DistributedType

logger = logging.getLogger(__name__)

_PATCH_FLAG = "_align_distill_cpu_gloo"
# The private accelerate method the fallback wraps, as accelerate 1.10-1.15 define it (pyproject pins that range;
# the wrapper refuses to install over any other signature instead of silently training each rank alone).
_PREPARE_BACKEND_PARAMETERS = ("self", "cpu", "sagemaker_dp", "backend")


def launched_world_size() -> int:
    """World size announced by the launcher (torchrun, deepspeed, accelerate launch, MPI); 1 when not launched."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def has_accelerator() -> bool:
    """A device accelerate would pick a backend for by itself (CUDA/ROCm, XPU, NPU, MPS...)."""

    if torch.cuda.is_available():
        return True
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator is not None and accelerator.is_available())


def _uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _install_gloo_fallback() -> None:
    """Make accelerate's backend resolution answer gloo for a launched process on a CPU-only box (idempotent)."""

    original = PartialState._prepare_backend
    if getattr(original, _PATCH_FLAG, False):
        return
    parameters = tuple(inspect.signature(original).parameters)
    if parameters != _PREPARE_BACKEND_PARAMETERS:
        raise RuntimeError(
            f"accelerate's PartialState._prepare_backend{parameters} is not the one align-distill wraps "
            f"{_PREPARE_BACKEND_PARAMETERS}: this accelerate version is untested for CPU launches; install "
            "accelerate>=1.10,<1.16 or launch on GPUs"
        )

    def _prepare_backend(self, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None):
        resolved, distributed_type = original(self, cpu, sagemaker_dp, backend)
        launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 or launched_world_size() > 1
        if resolved is None and distributed_type == DistributedType.NO and launched:
            # DeepSpeed: PartialState initialises deepspeed.comm with this backend and then marks itself DEEPSPEED.
            # Plain DDP: MULTI_CPU is what `cpu=True` would give, without turning DeepSpeed off elsewhere.
            return "gloo", (DistributedType.NO if _uses_deepspeed() else DistributedType.MULTI_CPU)
        return resolved, distributed_type

    setattr(_prepare_backend, _PATCH_FLAG, True)
    PartialState._prepare_backend = _prepare_backend


def init_cpu_process_group() -> Any | None:
    """Join the launched processes into one gloo process group when there is no GPU; return the `PartialState`.

    Does nothing (returns None) on a machine with an accelerator or in a single, unlaunched process. Must run
    before `TrainingArguments` (or a TRL config) is created, because that is when the trainer's state is made.
    """
    if launched_world_size() <= 1 or has_accelerator():
        return None

    _install_gloo_fallback()
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        logger.warning(
            "FSDP on a CPU-only machine: accelerate enables FSDP for GPU-type states only, so these processes train "
            "as DDP over gloo (same results, no sharding); the FSDP2 config shards on GPUs (docs/scaling-out.md)"
        )
    state = PartialState(backend="gloo")
    if not dist.is_initialized() or state.num_processes != launched_world_size():
        raise RuntimeError(
            f"rank {os.environ.get('RANK', '?')}: expected a gloo process group of {launched_world_size()} "
            f"processes (WORLD_SIZE), accelerate made {state.num_processes}; check MASTER_ADDR / MASTER_PORT"
        )
    logger.info("CPU process group: gloo, rank %d of %d", state.process_index, state.num_processes)
    return state


@contextlib.contextmanager
def gathered_head(*params: torch.Tensor | None) -> Iterator[None]:
    """Gather ZeRO-3-partitioned LM-head parameters (weight, bias) whole, once per step, around a fused loss call
    and its backward.

    The fused losses (`align_distill.losses.fused`) compute the head's gradient inside the call, one vocabulary
    tile at a time, from one gathered weight: one all-gather per step, not one per tile (TRL's note on DTensor heads
    makes the same point). The backward must run inside too: it hands that gradient to the weight, and ZeRO-3's
    gradient hooks need the weight whole then (tests/test_distributed.py::test_fused_loss_under_zero3). Collective
    under ZeRO-3 (every rank must enter); parameters that are not partitioned (`ds_id` is DeepSpeed's mark) and
    `None` are left alone, so the same code runs without DeepSpeed.
    """
    partitioned = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed  # optional, heavy: only under ZeRO-3

    with deepspeed.zero.GatheredParameters(partitioned):
        yield
