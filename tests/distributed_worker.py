"""One process of a distributed test run: train each requested method through the CLI and report what it saw.

    torchrun --nproc_per_node 2 tests/distributed_worker.py SPEC.json     # DDP / ZeRO-2 / ZeRO-3 (spec["mode"])
    python tests/distributed_worker.py SPEC.json                          # the single-process reference

Each method runs `align-distill train METHOD --config <yaml>` (the user's path), one after another in the same
process group. The trainer is captured when `train` starts; afterwards every rank writes
`<out>/<method>/rank<R>.json` with the process count accelerate and the trainer saw, the logged losses, and how
ZeRO holds the student's parameters and optimizer state and the frozen models (teacher / reference).

Adding a distillation trainer to the distributed tests is one entry in `CASES`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, NamedTuple


class Case(NamedTuple):
    """A method's tiny distributed run: its dataset file, recipe keys, and the trainer attributes holding its
    frozen models (teachers / references). "{teacher}" / "{student}" are the tiny model folders, "{data}" the data
    folder; the student is the trained model in every case."""

    data: str
    keys: dict[str, Any] = {}
    frozen: tuple[str, ...] = ()


LIVE_TEACHER = {"teacher_mode": "live", "teacher_model_name_or_path": "{teacher}"}
CASES: dict[str, Case] = {
    "sft": Case("sft.jsonl"),
    "dpo": Case("pairs.jsonl", {"beta": 0.1}, ("ref_model",)),
    "dckd": Case("pairs.jsonl", LIVE_TEACHER, ("teacher",)),
    "adpa": Case(
        "responses.jsonl",
        {**LIVE_TEACHER, "reference_model_name_or_path": "{student}", "preference_path": "{data}/pairs.jsonl"},
        ("teacher", "reference"),
    ),
    "aligndistil": Case(
        "pairs.jsonl",
        {"teacher_model_name_or_path": "{teacher}", "reference_model_name_or_path": "{student}"},
        ("dpo_model", "rev_dpo_model"),
    ),
    "mod": Case("sft.jsonl", {"stage": "d2d", "teacher_model_name_or_path": "{teacher}"}, ("teacher_model",)),
    "kd": Case("sft.jsonl", LIVE_TEACHER, ("teacher",)),
    # two cycles of 8 prompts (sampling, noisy-oracle and likelihood ranking, PRO training): cycle 2 samples from
    # the weights cycle 1 trained, which ZeRO-3 must gather first. `max_steps` applies to each cycle.
    "cyclealign": Case(
        "prompts.jsonl",
        {
            "cycles": 2,
            "prompts_per_cycle": 8,
            "num_responses": 3,
            "max_completion_length": 8,
            "generation_batch_size": 8,
            "min_agreement": 2,
            "black_box": {"kind": "noisy_oracle", "function": "align_distill.synthetic:reward", "noise": 0.3},
        },
    ),
}

# Recipe keys shared by every case: a fixed, sequential data order so that one process with batch 2B sees the same
# global batches as two processes with batch B; fp32; nothing saved but the final model.
COMMON: dict[str, Any] = {
    "learning_rate": 1e-3,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "logging_steps": 1,
    "save_strategy": "no",
    "bf16": False,
    "max_length": 64,
    "seed": 0,
    "train_sampling_strategy": "sequential",
    "dataloader_num_workers": 0,
    "dataloader_pin_memory": False,
    "gradient_checkpointing": False,
    "disable_tqdm": True,
}


def recipe(spec: dict[str, Any], method: str) -> dict[str, Any]:
    data_file, keys, _ = CASES[method]
    models = spec["models"]
    keys = {k: v.format(**models, data=spec["data"]) if isinstance(v, str) else v for k, v in keys.items()}
    config = {
        **COMMON,
        "model_name_or_path": models["student"],
        "dataset_name": str(Path(spec["data"]) / data_file),
        "output_dir": str(Path(spec["out"]) / method / "model"),
        "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["batch"],
        **keys,
    }
    if spec.get("deepspeed"):
        config["deepspeed"] = spec["deepspeed"]
    return config


def zero_report(trainer: Any) -> dict[str, Any]:
    """How the student's parameters and optimizer state are held (ZeRO stage, local vs full sizes)."""
    engine = trainer.model_wrapped
    report: dict[str, Any] = {"wrapper": type(engine).__name__}
    if not hasattr(engine, "zero_optimization_stage"):
        return report
    report["stage"] = engine.zero_optimization_stage()
    for key, offload in (
        ("offload_optimizer", engine.zero_offload_optimizer()),
        ("offload_param", engine.zero_offload_param()),
    ):
        report[key] = None if offload is None else str(getattr(offload.device, "value", offload.device))
    report["optimizer"] = type(engine.basic_optimizer).__name__
    params = [p for p in engine.module.parameters() if p.requires_grad]
    report["trainable_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    if report["stage"] == 3:
        report["params"] = param_partition(engine.module)
        flat = engine.optimizer.fp32_partitioned_groups_flat
    else:
        flat = engine.optimizer.single_partition_of_fp32_groups
    report["optimizer_local_numel"] = sum(t.numel() for t in flat)
    return report


def param_partition(module: Any) -> dict[str, Any]:
    """ZeRO-3 bookkeeping of a module's parameters: full sizes (ds_numel), this rank's shard, what is visible."""
    params = list(module.parameters())
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    return {
        "count": len(params),
        "zero3": len(partitioned),
        "ds_numel": sum(p.ds_numel for p in partitioned),
        "local_numel": sum(p.ds_tensor.numel() for p in partitioned),
        "visible_numel": sum(p.numel() for p in params),
        "largest_ds_numel": max((p.ds_numel for p in partitioned), default=0),
        "largest_local_numel": max((p.ds_tensor.numel() for p in partitioned), default=0),
        "status": sorted({p.ds_status.name for p in partitioned}),
    }


def frozen_report(model: Any) -> dict[str, Any]:
    module = getattr(model, "module", model)
    report = {"type": type(model).__name__, "trainable": sum(p.requires_grad for p in module.parameters())}
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        report["params"] = param_partition(module)
    return report


def run_method(spec: dict[str, Any], method: str, captured: list[Any]) -> dict[str, Any]:
    import yaml
    from accelerate import PartialState

    from align_distill.cli import main as cli_main

    config = recipe(spec, method)
    path = Path(spec["out"]) / method / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:
        path.write_text(yaml.safe_dump(config))
    _barrier()
    captured.clear()
    code = cli_main(["train", method, "--config", str(path)])
    trainer = captured[-1]
    state = PartialState()
    return {
        "exit_code": code,
        "partial_state": {
            "num_processes": state.num_processes,
            "process_index": state.process_index,
            "distributed_type": str(state.distributed_type),
            "backend": state.backend,
        },
        "trainer": {
            "num_processes": trainer.accelerator.num_processes,
            "world_size": trainer.args.world_size,
            "is_deepspeed_enabled": bool(trainer.is_deepspeed_enabled),
            "train_batch_size": trainer._train_batch_size,
        },
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        # every trainer the method ran, in order (CycleAlign: one per cycle; the other methods: one)
        "all_losses": [[e["loss"] for e in t.state.log_history if "loss" in e] for t in captured],
        "zero": zero_report(trainer),
        "frozen": {name: frozen_report(getattr(trainer, name)) for name in CASES[method].frozen},
    }


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    from transformers import Trainer

    from align_distill.distributed import init_cpu_process_group

    init_cpu_process_group()
    captured: list[Any] = []
    original_train = Trainer.train

    def train(self, *args, **kwargs):
        captured.append(self)
        return original_train(self, *args, **kwargs)

    Trainer.train = train
    rank = int(os.environ.get("RANK", "0"))
    for method in spec["methods"]:
        try:
            result = run_method(spec, method, captured)
        except BaseException:  # SystemExit too: report it and go on, the other methods' results still count
            result = {"error": traceback.format_exc()}
        out = Path(spec["out"]) / method / f"rank{rank}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return 0  # failures are in the result files, where the test reads them per method


def fused_zero3(out: str) -> int:
    """`fused_kd_loss` on a ZeRO-3 student (2 gloo ranks, half the batch each): the LM head gathered once per step
    by `gathered_head`, the loss and the full gradients written to `<out>/rank<R>.json` beside a one-process
    reference on the whole batch (same seed on every rank), for `test_fused_loss_under_zero3`."""
    import deepspeed
    import torch
    from accelerate import PartialState

    from align_distill.distributed import gathered_head
    from align_distill.losses import fused_kd_loss

    state = PartialState(backend="gloo")
    assert state.num_processes == 2, state.num_processes
    vocab, hidden, batch, steps = 40, 8, 4, 2
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (steps, batch, 6), generator=g)
    teacher_hidden, teacher_weight = torch.randn(steps, batch, 6, 5, generator=g), torch.randn(vocab, 5, generator=g)
    mask = torch.ones(batch, 6, dtype=torch.bool)

    class Student(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, hidden)
            self.head = torch.nn.Linear(hidden, vocab, bias=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.embed(ids))  # the head is applied by the loss, from these hidden states

    def build() -> Student:
        torch.manual_seed(1)
        return Student()

    reference = build()
    config = {
        "train_micro_batch_size_per_gpu": batch // 2,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    student = build()
    engine, *_ = deepspeed.initialize(
        model=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.5), config=config
    )
    weight = engine.module.head.weight
    gathers = []
    original_all_gather = weight.all_gather
    weight.all_gather = lambda *a, **k: gathers.append(1) or original_all_gather(*a, **k)
    rank, rows = state.process_index, slice(state.process_index * batch // 2, (state.process_index + 1) * batch // 2)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    results: list[dict[str, Any]] = []
    for step in range(steps):
        with gathered_head(weight):  # whole while the loss runs and while its gradient reaches the weight
            loss = fused_kd_loss(
                engine(tokens[step, rows]), weight, teacher_hidden[step, rows], teacher_weight, mask[rows],
                "jsd", vocab_tile=16, row_chunk=5,
            )
            engine.backward(loss)
        head_grad = deepspeed.utils.safe_get_full_grad(weight)
        embed_grad = deepspeed.utils.safe_get_full_grad(engine.module.embed.weight)
        engine.step()
        reference_optimizer.zero_grad()
        full = fused_kd_loss(reference(tokens[step]), reference.head.weight, teacher_hidden[step], teacher_weight,
                             mask, "jsd")
        full.backward()
        reference_optimizer.step()
        losses = [torch.zeros(()) for _ in range(2)]
        torch.distributed.all_gather(losses, loss.detach().float())
        results.append({
            "loss_mean": float(sum(losses) / 2),
            "reference_loss": full.item(),
            "head_grad_diff": float((head_grad - reference.head.weight.grad).abs().max()),
            "embed_grad_diff": float((embed_grad - reference.embed.weight.grad).abs().max()),
            "head_grad_norm": float(head_grad.norm()),
        })
    report = {"num_processes": state.num_processes, "gathers": len(gathers), "steps": results}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report, indent=2))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--fused-zero3":
        code = fused_zero3(sys.argv[2])
        # A bare DeepSpeed engine leaves a native thread running; the interpreter's teardown then aborts the process
        # ("terminate called without an active exception") after the results are written. Skip that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(main(sys.argv[1]))
