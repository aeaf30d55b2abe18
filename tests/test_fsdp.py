"""The shipped FSDP2 launcher file, align_distill/configs/accelerate/fsdp2.yaml.

`test_fsdp2_yaml_is_a_valid_accelerate_config` (fast): accelerate 1.15's own config class reads it, `accelerate
launch` turns it into the FSDP2 environment, and accelerate's FSDP plugin accepts every value.

`test_fsdp2_trains_sft_on_two_processes` (slow, distributed): two gloo processes train SFT for two steps with the
file and save the model. On a CPU-only machine accelerate switches a launched process to FSDP only for GPU-type
states, so `align-distill train` alone would run these ranks as DDP over gloo (MULTI_CPU, unsharded; see
docs/scaling-out.md). The worker therefore marks accelerate's state FSDP itself (what accelerate does on GPUs) and
then runs the unchanged `align-distill train sft`; the test asserts that this really was FSDP2 on two processes
(DTensor shards of half the parameters per rank) and that the saved model is whole.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_distributed import LAUNCH_TIMEOUT, REPO, WORLD, free_port, run, saved_weights

FSDP2_YAML = REPO / "align_distill" / "configs" / "accelerate" / "fsdp2.yaml"

WORKER = r"""
import json, os, sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    # accelerate 1.15 sets FSDP only for GPU-type states; on CPU the gloo fallback gives MULTI_CPU: mark it FSDP
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        from accelerate.state import PartialState

        self.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_fsdp

import transformers
from torch.distributed.tensor import DTensor

_train = transformers.Trainer.train


def _train_and_record(self, *args, **kwargs):
    result = _train(self, *args, **kwargs)
    accelerator = self.accelerator
    params = list(self.model_wrapped.parameters())
    record = {
        "rank": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "trainer_num_processes": self.args.world_size,
        "distributed_type": str(accelerator.distributed_type),
        "is_fsdp2": accelerator.is_fsdp2,
        "model": type(self.model_wrapped).__name__,
        "dtensors": sum(isinstance(p, DTensor) for p in params),
        "params": len(params),
        "numel": sum(p.numel() for p in params),
        "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
        "losses": [entry["loss"] for entry in self.state.log_history if "loss" in entry],
    }
    with open(os.path.join(os.environ["FSDP_TEST_OUT"], f"rank{record['rank']}.json"), "w") as handle:
        json.dump(record, handle)
    return result


transformers.Trainer.train = _train_and_record

from align_distill import cli

sys.exit(cli.main(sys.argv[1:]))
"""


def test_fsdp2_yaml_is_a_valid_accelerate_config(monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import StateDictType

    config = ClusterConfig.from_yaml_file(str(FSDP2_YAML))
    assert config.distributed_type == DistributedType.FSDP
    assert config.num_processes == -1  # no hard-coded count: --num_processes is required (train.sh passes it)
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_state_dict_type"] in ("FULL_STATE_DICT", "SHARDED_STATE_DICT")

    # what `accelerate launch` hands the processes, and accelerate's FSDP plugin built from it
    arguments = ["--config_file", str(FSDP2_YAML), "--num_processes", "2", "train.py"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(arguments))
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for name, value in env.items():
        if name.startswith("FSDP_"):
            monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True and plugin.cpu_ram_efficient_loading
    assert plugin.state_dict_type == StateDictType[fsdp["fsdp_state_dict_type"]]
    assert plugin.auto_wrap_policy is not None

    for name in ("ddp", "zero2", "zero3"):  # the other launcher files leave the count to --num_processes too
        assert ClusterConfig.from_yaml_file(str(FSDP2_YAML.with_name(f"{name}.yaml"))).num_processes == -1, name


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_trains_sft_on_two_processes(tiny_models, tmp_path):
    from align_distill import synthetic

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in synthetic.sft_rows(8, seed=3)))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"model_name_or_path": str(tiny_models["student"]), "dataset_name": str(data),
             "output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 2,
             "logging_steps": 1, "bf16": False, "save_strategy": "no", "max_length": 64, "disable_tqdm": True}
        )
    )  # fmt: skip
    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(WORKER)
    results = tmp_path / "results"
    results.mkdir()
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_YAML),
        "--num_processes", str(WORLD), "--main_process_port", str(free_port()),
        str(worker), "train", "sft", "--config", str(recipe),
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FSDP_TEST_OUT", str(results))  # run() passes os.environ on
        run(command, tmp_path / "launch.log", timeout=LAUNCH_TIMEOUT)

    ranks = [json.loads((results / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    for rank, result in enumerate(ranks):
        assert result["rank"] == rank
        assert result["num_processes"] == WORLD and result["trainer_num_processes"] == WORLD, result
        assert result["distributed_type"] == "DistributedType.FSDP" and result["is_fsdp2"], result
        assert result["model"].startswith("FSDP"), result  # fully_shard's wrapper class
        assert result["dtensors"] == result["params"] > 0, result  # every parameter sharded
        assert result["local_numel"] < 0.6 * result["numel"], result  # about half each (dim 0 split, uneven)
    assert sum(result["local_numel"] for result in ranks) == ranks[0]["numel"]  # disjoint shards of the whole
    losses = ranks[0]["losses"]
    assert len(losses) == 2 and ranks[1]["losses"] == losses and all(math.isfinite(x) for x in losses), losses

    before = saved_weights(Path(tiny_models["student"]))
    after = saved_weights(tmp_path / "out")
    assert before.keys() <= after.keys()
    for key in before:
        assert after[key].shape == before[key].shape, key  # the full state dict, gathered on save
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed, "no weight changed in two steps"
