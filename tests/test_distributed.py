"""Two CPU processes (gloo) under DDP, DeepSpeed ZeRO-2 and ZeRO-3, against one process on the same global batch.

Each launch runs every method in `distributed_worker.CASES` through `align-distill train` on the tiny models
(`STEPS` steps, `BATCH` rows per process); the reference is one process with `2 * BATCH` rows per step. The data is
built so that the two halves of every global batch have the same token counts: a per-process token mean then
equals the global one, so every method's loss (token-, sequence- or pair-mean) must match the reference.

Launchers, one per mode, so each launch path is exercised: DDP and ZeRO-2 with `accelerate launch` and the shipped
align_distill/configs/accelerate/*.yaml (+ align_distill/configs/deepspeed/zero2.json),
ZeRO-3 with the `deepspeed` launcher and the shipped
align_distill/configs/deepspeed/zero3.json with `stage3_param_persistence_threshold: 0`, so the tiny models are really
partitioned.

CycleAlign (two cycles: sample, rank, train) is compared the same way, cycle by cycle: its samples use per-row
seeds, so splitting them into one store part per process changes none, and its loss is a mean over prompts.

Tolerance: losses and final weights match the reference within `RTOL`/`ATOL` (fp32; only the order of the
cross-process reductions differs).

`test_zero3_offload_config_trains_on_two_processes` runs the shipped
align_distill/configs/deepspeed/zero3_offload.json once
(SFT, 2 steps): it must train, with DeepSpeedCPUAdam and both offloads, on two processes.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.distributed_worker import CASES

REPO = Path(__file__).resolve().parents[1]

STEPS = 3
BATCH = 2
WORLD = 2
RTOL, ATOL = 1e-4, 1e-5
LAUNCH_TIMEOUT = 420
MODES = ("ddp", "zero2", "zero3")
METHODS = tuple(CASES)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def remove_shm_buffers(port: str | int) -> None:
    """Delete the shared-memory all-reduce buffers DeepSpeed's CPU communication left for the job on `port`: it
    does not unlink them at exit (~138 MB per launch in /dev/shm, which is memory)."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def launcher_port(command: list[str]) -> str | None:
    for flag in ("--main_process_port", "--master_port"):
        if flag in command:
            return command[command.index(flag) + 1]
    return None


def run(command: list[str], log: Path, timeout: int = LAUNCH_TIMEOUT) -> None:
    """Run a launcher in its own process group; on a timeout kill the whole group (launcher and ranks). Then remove
    the job's shared-memory buffers (`remove_shm_buffers`)."""
    try:
        with open(log, "w") as handle:
            process = subprocess.Popen(
                command, cwd=REPO, env=worker_env(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
                pytest.fail(f"{command[0]} timed out after {timeout}s; log:\n{log.read_text()[-6000:]}")
    finally:
        if (port := launcher_port(command)) is not None:
            remove_shm_buffers(port)
    if process.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {process.returncode}; log:\n{log.read_text()[-8000:]}")


# -- data: the two halves of every global batch have equal token counts ---------------------------------------------
def _token_counts(tokenizer, prompt: list[dict], responses: list[list[dict]]) -> tuple[int, ...]:
    def count(messages: list[dict], generation_prompt: bool) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return (count(prompt, True), *(count(prompt + response, False) for response in responses))


def matched_rows(rows: list[dict], responses: tuple[str, ...], tokenizer, n_steps: int) -> list[dict]:
    """`n_steps * 2 * BATCH` distinct rows, ordered so that process 1's rows of each global batch have the same token
    counts (prompt, prompt + each response) as process 0's: row i of rank 0 is paired with a twin for rank 1."""
    groups: dict[tuple[int, ...], list[dict]] = {}
    for row in rows:
        groups.setdefault(_token_counts(tokenizer, row["prompt"], [row[r] for r in responses]), []).append(row)
    twins = [pair for group in groups.values() for pair in zip(group[0::2], group[1::2])]
    needed = n_steps * BATCH
    if len(twins) < needed:
        raise AssertionError(f"only {len(twins)} length-matched pairs in {len(rows)} rows; need {needed}")
    ordered = []
    for step in range(n_steps):
        chunk = twins[step * BATCH : (step + 1) * BATCH]
        ordered += [a for a, _ in chunk] + [b for _, b in chunk]  # rank 0 takes the first BATCH rows, rank 1 the rest
    return ordered


@pytest.fixture(scope="module")
def dist_data(tiny_models, tiny_tokenizer, tmp_path_factory) -> Path:
    from align_distill import synthetic

    out = tmp_path_factory.mktemp("dist_data")
    sft = matched_rows(synthetic.sft_rows(400, seed=3), ("completion",), tiny_tokenizer, STEPS)
    pairs = matched_rows(synthetic.preference_rows(400, seed=4), ("chosen", "rejected"), tiny_tokenizer, STEPS)
    # ADPA's student responses: as if the student had answered each prompt with the rejected response
    eos = [tiny_tokenizer.eos_token_id]
    responses = [
        {"id": row["id"], "prompt": row["prompt"], "completion_ids": tokenize(tiny_tokenizer, row["rejected"]) + eos}
        for row in pairs
    ]
    prompts = synthetic.prompt_rows(16, seed=7)  # CycleAlign: two cycles of 8 prompts
    files = (("sft.jsonl", sft), ("pairs.jsonl", pairs), ("responses.jsonl", responses), ("prompts.jsonl", prompts))
    for name, rows in files:
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def tokenize(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer(messages[0]["content"], add_special_tokens=False)["input_ids"]


def build_op(module: str, builder: str, log: Path) -> None:
    """JIT-build (or load from the torch extensions cache) one DeepSpeed op in a single process, so that two ranks
    do not race for it; a failed build fails the test with the compiler's log."""
    code = f"from {module} import {builder} as B; B().load()"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    try:
        with open(log, "w") as handle:
            subprocess.run(
                [sys.executable, "-c", code], env=worker_env(), timeout=900, check=True, stdout=handle,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"building {builder} did not finish in 900s; a killed earlier build leaves a stale `lock` file under "
            f"{root} that makes every later build wait: remove it if no build is running. Log:\n"
            f"{log.read_text()[-3000:]}"
        )
    except subprocess.CalledProcessError:
        pytest.fail(f"building {builder} failed (needs a C++ compiler and ninja); log:\n{log.read_text()[-6000:]}")


@pytest.fixture(scope="module")
def deepspeed_ops(tmp_path_factory) -> None:
    """Build DeepSpeed's CPU shared-memory comm extension once, in one process, before two ranks race for it."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    build_op("deepspeed.ops.op_builder.cpu", "ShareMemCommBuilder", tmp_path_factory.mktemp("ds_build") / "build.log")


def launch(mode: str, spec: dict, out: Path) -> Path:
    spec = {**spec, "mode": mode, "out": str(out)}
    spec_path = out / "spec.json"
    out.mkdir(parents=True, exist_ok=True)
    worker = str(REPO / "tests" / "distributed_worker.py")
    port = str(free_port())
    if mode == "single":
        command = [sys.executable, worker, str(spec_path)]
        spec["batch"] = WORLD * BATCH
    elif mode in ("ddp", "zero2"):
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "align_distill" / "configs" / "accelerate" / f"{mode}.yaml"),
            "--num_processes",
            str(WORLD),
            "--main_process_port",
            port,
        ]
        if mode == "zero2":
            command += [
                "--deepspeed_config_file",
                str(REPO / "align_distill" / "configs" / "deepspeed" / "zero2.json"),
            ]
        command += [worker, str(spec_path)]
    else:  # zero3, zero3_offload: the shipped config of that name
        ds = json.loads((REPO / "align_distill" / "configs" / "deepspeed" / f"{mode}.json").read_text())
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny norms
        spec["deepspeed"] = str(out / f"{mode}.json")
        Path(spec["deepspeed"]).write_text(json.dumps(ds))
        hostfile = out / "hostfile"
        hostfile.write_text(f"node-0 slots={WORLD}\n")
        command = [
            sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
            "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", port, "--no_local_rank",
            worker, str(spec_path),
        ]  # fmt: skip
    spec_path.write_text(json.dumps(spec))
    run(command, out / "launch.log")
    return out


@pytest.fixture(scope="module")
def spec(tiny_models, dist_data) -> dict:
    return {
        "models": {"student": str(tiny_models["student"]), "teacher": str(tiny_models["teacher"])},
        "data": str(dist_data),
        "steps": STEPS,
        "batch": BATCH,
        "methods": list(METHODS),
    }


@pytest.fixture(scope="module")
def reference(spec, tmp_path_factory) -> Path:
    return launch("single", spec, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module", params=MODES)
def distributed(request, spec, deepspeed_ops, tmp_path_factory) -> tuple[str, Path]:
    mode = request.param
    return mode, launch(mode, spec, tmp_path_factory.mktemp(mode))


def results(out: Path, method: str, ranks: int) -> list[dict]:
    found = []
    for rank in range(ranks):
        path = out / method / f"rank{rank}.json"
        if not path.exists():
            log = (out / "launch.log").read_text()[-6000:]
            pytest.fail(f"{method}: rank {rank} wrote no result; launch log:\n{log}")
        result = json.loads(path.read_text())
        assert "error" not in result, f"{method} rank {rank} failed:\n{result['error']}"
        found.append(result)
    return found


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}: {sorted(p.name for p in folder.iterdir())}"
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one(distributed, reference, method):
    mode, out = distributed
    ranks = results(out, method, WORLD)
    (single,) = results(reference, method, 1)

    # one process group of two: accelerate and the trainer both count two processes, and the batch is split
    assert single["trainer"]["num_processes"] == 1
    for result in ranks:
        assert result["partial_state"]["num_processes"] == WORLD, result["partial_state"]
        assert result["partial_state"]["backend"] == "gloo"
        assert result["trainer"]["num_processes"] == WORLD
        assert result["trainer"]["world_size"] == WORLD
        assert result["trainer"]["train_batch_size"] == BATCH
    assert sorted(r["partial_state"]["process_index"] for r in ranks) == list(range(WORLD))
    expected_type = "DistributedType.MULTI_CPU" if mode == "ddp" else "DistributedType.DEEPSPEED"
    assert {r["partial_state"]["distributed_type"] for r in ranks} == {expected_type}

    # how the student is held
    for result in ranks:
        zero = result["zero"]
        if mode == "ddp":
            assert zero["wrapper"] == "DistributedDataParallel"
            continue
        assert zero["wrapper"] == "DeepSpeedEngine" and zero["stage"] == int(mode[-1])
        total = zero["trainable_numel"]
        # ZeRO-2 and -3 keep only this rank's share of the fp32 master weights / optimizer state (plus padding)
        assert total / WORLD <= zero["optimizer_local_numel"] <= total / WORLD + 64 * WORLD, zero
        if mode == "zero3":
            params = zero["params"]
            assert params["zero3"] == params["count"] > 0
            assert params["visible_numel"] == 0  # between steps nothing is gathered
            assert params["status"] == ["NOT_AVAILABLE"]
            assert params["ds_numel"] == total
            assert params["ds_numel"] / WORLD <= params["local_numel"] <= params["ds_numel"] / WORLD + params["count"]

    # frozen teachers / references: sharded inference engines under ZeRO-3, untouched models otherwise
    for name in CASES[method].frozen:
        for result in ranks:
            frozen = result["frozen"][name]
            if name != "ref_model":  # TRL's DPO reference keeps requires_grad (it only runs under no_grad)
                assert frozen["trainable"] == 0
            if mode == "zero3":
                assert frozen["type"] == "DeepSpeedEngine", frozen
                params = frozen["params"]
                assert params["largest_local_numel"] == -(-params["largest_ds_numel"] // WORLD), params
                assert params["local_numel"] < params["ds_numel"]
            elif mode == "zero2":
                assert frozen["type"] == "DeepSpeedEngine"  # stage 0 engine: a full copy per rank, no optimizer
            else:
                assert frozen["type"] != "DistributedDataParallel"

    # the same losses and the same final weights as one process on the same global batches
    losses = ranks[0]["losses"]
    assert len(losses) == STEPS and ranks[1]["losses"] == losses
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single["losses"]), rtol=RTOL, atol=ATOL)
    assert len(ranks[0]["all_losses"]) == len(single["all_losses"]) == (2 if method == "cyclealign" else 1)
    for mine, theirs in zip(ranks[0]["all_losses"], single["all_losses"]):  # CycleAlign: every cycle's training
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=RTOL, atol=ATOL)
    if method == "cyclealign":
        assert_same_cycles(out / method / "model", reference / method / "model")
    mine, theirs = saved_weights(out / method / "model"), saved_weights(reference / method / "model")
    assert theirs.keys() <= mine.keys()
    for extra in mine.keys() - theirs.keys():  # ZeRO-2 also writes the tied lm_head: a copy of the embedding
        assert any(torch.equal(mine[extra], mine[key]) for key in theirs), f"{extra} is not a tied copy"
    for key in theirs:
        assert mine[key].shape == theirs[key].shape, key  # ZeRO-3 gathered full tensors on save
        torch.testing.assert_close(mine[key], theirs[key], rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.slow
@pytest.mark.distributed
def test_fused_loss_under_zero3(deepspeed_ops, tmp_path):
    """`fused_kd_loss` with a ZeRO-3-partitioned LM head on 2 gloo ranks (half the batch each), the head gathered
    once per step by `distributed.gathered_head`: loss, full head and embedding gradients and the second step
    (after an optimizer step) match one process on the whole batch (`distributed_worker.fused_zero3`)."""
    worker = str(REPO / "tests" / "distributed_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
               str(free_port()), worker, "--fused-zero3", str(tmp_path)]
    run(command, tmp_path / "launch.log", timeout=300)
    for rank in range(WORLD):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["num_processes"] == WORLD
        assert report["gathers"] == len(report["steps"]) == 2  # one all-gather of the head per step, not per tile
        for step in report["steps"]:
            assert step["head_grad_norm"] > 0
            assert math.isclose(step["loss_mean"], step["reference_loss"], rel_tol=RTOL, abs_tol=ATOL)
            assert step["head_grad_diff"] < ATOL and step["embed_grad_diff"] < ATOL


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_offload_config_trains_on_two_processes(spec, deepspeed_ops, tmp_path):
    """The shipped align_distill/configs/deepspeed/zero3_offload.json trains SFT on two processes: ZeRO-3 with the
    optimizer
    (DeepSpeedCPUAdam, a C++ op JIT-built on first use: ~3.5 min on 2 cores, then cached under
    ~/.cache/torch_extensions) and the parameters offloaded to the CPU. On a CPU-only box offloading moves nothing,
    so this checks that the config is valid and trains, not that it saves accelerator memory."""
    build_op("deepspeed.ops.op_builder", "CPUAdamBuilder", tmp_path / "cpu_adam.log")  # what DeepSpeedCPUAdam loads
    out = launch("zero3_offload", {**spec, "methods": ["sft"], "steps": 2}, tmp_path / "run")
    ranks = results(out, "sft", WORLD)
    for result in ranks:
        assert result["partial_state"]["num_processes"] == WORLD and result["trainer"]["num_processes"] == WORLD
        assert result["partial_state"]["distributed_type"] == "DistributedType.DEEPSPEED"
        zero = result["zero"]
        assert zero["stage"] == 3 and zero["offload_optimizer"] == zero["offload_param"] == "cpu", zero
        assert zero["optimizer"] == "DeepSpeedCPUAdam", zero
        params = zero["params"]
        assert params["zero3"] == params["count"] > 0 and params["visible_numel"] == 0, params
        assert params["ds_numel"] / WORLD <= params["local_numel"] <= params["ds_numel"] / WORLD + params["count"]
    losses = ranks[0]["losses"]
    assert len(losses) == 2 and ranks[1]["losses"] == losses and all(math.isfinite(x) for x in losses), losses
    before = saved_weights(Path(spec["models"]["student"]))
    after = saved_weights(out / "sft" / "model")
    assert before.keys() <= after.keys()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    for key in before:
        assert after[key].shape == before[key].shape, key  # gathered whole on save
    assert len(changed) == len(before), sorted(before.keys() - set(changed))  # every tensor got an Adam step


def assert_same_cycles(run: Path, reference: Path) -> None:
    """CycleAlign's cycles, sampled and ranked in one store part per process, hold what one process produced: the
    same candidates, black-box and white-box rankings and training targets, every prompt trained on. Samples are
    drawn with per-row seeds; cycle 2 samples from weights that equal the reference's only up to the order of the
    cross-process reductions, which at fp32 changes no sampled token of these tiny runs (if it ever did, the losses
    could not match either, and this comparison says where the runs parted)."""
    for cycle in (1, 2):
        folder = f"cycle_{cycle}"
        rows = [json.loads(line) for line in (run / folder / "rankings.jsonl").read_text().splitlines()]
        expected = [json.loads(line) for line in (reference / folder / "rankings.jsonl").read_text().splitlines()]
        keys = ("id", "completions", "black_box", "white_box", "target")
        assert [{k: r[k] for k in keys} for r in rows] == [{k: r[k] for k in keys} for r in expected], folder
        metrics = json.loads((run / folder / "metrics.json").read_text())
        assert metrics["training_prompts"] == metrics["prompts"] == 8, metrics  # 2 full global batches per epoch
        for store in ("samples", "black_box", "white_box"):  # one part per process
            assert len(list((run / folder / store).glob("manifest-*-of-00002.json"))) == WORLD, store


# -- the launch scripts ---------------------------------------------------------------------------------------------
def script_env(**env: str) -> dict[str, str]:
    """The worker environment with the venv's launchers (accelerate, deepspeed, torchrun, align-distill) on PATH."""
    base = worker_env()
    return {**base, "PATH": os.pathsep.join([str(Path(sys.executable).parent), base["PATH"]]), **env}


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / script), *args],
        env=script_env(DRY_RUN="1", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [line.split() for line in result.stdout.strip().splitlines()]


def test_train_sh_composes_each_launcher(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_steps: 1\n")
    nodes = {"NNODES": "2", "NPROC_PER_NODE": "4", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "2999"}

    (command,) = dry_run("train.sh", "dckd", str(recipe), "--max_steps", "5", **nodes)
    assert command[:2] == ["accelerate", "launch"]
    assert command[command.index("--config_file") + 1] == str(REPO / "align_distill/configs/accelerate/zero3.yaml")
    assert command[command.index("--deepspeed_config_file") + 1] == str(
        REPO / "align_distill/configs/deepspeed/zero3.json"
    )
    for flag, value in (("--num_machines", "2"), ("--num_processes", "8"), ("--machine_rank", "1"),
                        ("--main_process_ip", "10.0.0.1"), ("--main_process_port", "2999")):  # fmt: skip
        assert command[command.index(flag) + 1] == value, flag
    assert command[-8:] == ["-m", "align_distill.cli", "train", "dckd", "--config", str(recipe), "--max_steps", "5"]

    (command,) = dry_run("train.sh", "sft", str(recipe), LAUNCHER="deepspeed", ZERO="zero2", **nodes)
    assert command[0] == "deepspeed" and "--no_ssh" in command and "--no_local_rank" in command
    assert command[command.index("--node_rank") + 1] == "1"
    assert command[command.index("--master_addr") + 1] == "10.0.0.1"
    tail = ["--module", "align_distill.cli", "train", "sft", "--config", str(recipe), "--deepspeed"]
    assert command[-8:-1] == tail and command[-1] == str(REPO / "align_distill/configs/deepspeed/zero2.json")

    (command,) = dry_run("train.sh", "sft", str(recipe), LAUNCHER="torchrun", ZERO="ddp", **nodes)
    assert command[0] == "torchrun" and "--deepspeed" not in command
    assert command[command.index("--nproc_per_node") + 1] == "4" and command[command.index("--nnodes") + 1] == "2"

    bad = subprocess.run(["bash", str(REPO / "scripts/train.sh"), "sft", str(recipe)], env=script_env(ZERO="zero4"),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "ZERO must be" in bad.stderr

    # FSDP2: the accelerate file alone, no DeepSpeed JSON; the process count always on the command line
    (command,) = dry_run("train.sh", "sft", str(recipe), ZERO="fsdp2", **nodes)
    assert command[command.index("--config_file") + 1] == str(REPO / "align_distill/configs/accelerate/fsdp2.yaml")
    assert "--deepspeed_config_file" not in command and command[command.index("--num_processes") + 1] == "8"
    bad = subprocess.run(["bash", str(REPO / "scripts/train.sh"), "sft", str(recipe)],
                         env=script_env(ZERO="fsdp2", LAUNCHER="torchrun"), capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "needs LAUNCHER=accelerate" in bad.stderr

    # a relative DS_CONFIG reaches accelerate as an absolute path (the shipped files' own path is checkout-relative)
    (tmp_path / "ds.json").write_text((REPO / "align_distill/configs/deepspeed/zero2.json").read_text())
    result = subprocess.run(["bash", str(REPO / "scripts/train.sh"), "sft", "recipe.yaml"], cwd=tmp_path,
                            env=script_env(DRY_RUN="1", ZERO="zero2", DS_CONFIG="ds.json"), capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    command = result.stdout.split()
    assert command[command.index("--deepspeed_config_file") + 1] == str(tmp_path.resolve() / "ds.json")


def test_generate_sh_splits_the_store_into_parts(tmp_path):
    config = tmp_path / "signals.yaml"
    teachers = [{"model": "a", "backend": "vllm"}, {"model": "b", "backend": "transformers"}, "c"]
    config.write_text(yaml.safe_dump({"input": "x", "output_dir": "y", "teachers": teachers}))
    commands = dry_run("generate.sh", "signals", str(config), "--limit", "8", NNODES="3", NODE_RANK="2", TP="4")
    (command,) = commands
    assert command[:3] == ["align-distill", "generate", "signals"]
    assert command[command.index("--part") + 1] == "2" and command[command.index("--num-parts") + 1] == "3"
    assert command[-2:] == ["--limit", "8"]
    # vLLM-only arguments reach only the vllm teacher: the transformers ones (explicit, and `c` by default) reject them
    vllm_args = [arg for arg in command if "backend_kwargs" in arg]
    assert vllm_args == ["--teachers.0.backend_kwargs.tensor_parallel_size"], command
    assert command[command.index(vllm_args[0]) + 1] == "4"

    # a command-line override that makes teacher 2 a vllm one; GPU_MEMORY_UTILIZATION goes the same way as TP
    (command,) = dry_run(
        "generate.sh", "signals", str(config), "--teachers.2.backend", "vllm", TP="2", GPU_MEMORY_UTILIZATION="0.5"
    )
    assert [arg for arg in command if "backend_kwargs" in arg] == [
        "--teachers.0.backend_kwargs.tensor_parallel_size",
        "--teachers.0.backend_kwargs.gpu_memory_utilization",
        "--teachers.2.backend_kwargs.tensor_parallel_size",
        "--teachers.2.backend_kwargs.gpu_memory_utilization",
    ], command
    assert command[-2:] == ["--teachers.2.backend", "vllm"]

    sample = tmp_path / "sample.yaml"
    sample.write_text(yaml.safe_dump({"input": "x", "output_dir": "y", "model": "m", "backend": "vllm"}))
    commands = dry_run("generate.sh", "sample", str(sample), NNODES="2", NODE_RANK="1", TP="2", ENGINES_PER_NODE="2")
    assert [c[1] for c in commands] == ["CUDA_VISIBLE_DEVICES=0\\,1", "CUDA_VISIBLE_DEVICES=2\\,3"]
    assert [c[c.index("--part") + 1] for c in commands] == ["2", "3"]
    assert {c[c.index("--num-parts") + 1] for c in commands} == {"4"}
    assert all(c[c.index("--backend_kwargs.tensor_parallel_size") + 1] == "2" for c in commands)

    # a transformers model (sample's default backend; a rank judge) gets no vLLM arguments
    sample.write_text(yaml.safe_dump({"input": "x", "output_dir": "y", "model": "m"}))
    rank = tmp_path / "rank.yaml"
    rank.write_text(yaml.safe_dump({"input": "x", "output_dir": "y", "judge": {"model": "j", "kind": "llm"}}))
    for job, path in (("sample", sample), ("rank", rank)):
        (command,) = dry_run("generate.sh", job, str(path), TP="2")
        assert not any("backend_kwargs" in arg for arg in command), command
    (command,) = dry_run("generate.sh", "rank", str(rank), "--judge.backend", "vllm", TP="2")
    assert command[command.index("--judge.backend_kwargs.tensor_parallel_size") + 1] == "2"


@pytest.mark.slow
@pytest.mark.distributed
def test_generate_sh_nodes_fill_one_store(tiny_models, tmp_path):
    """Two "nodes" run scripts/generate.sh with their NODE_RANK: together they write every row exactly once."""
    from align_distill.data_gen import load_store

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"sort: {' '.join('abcde'[i:])}"}) + "\n" for i in range(5)))
    config = tmp_path / "sample.yaml"
    store = tmp_path / "store"
    config.write_text(
        yaml.safe_dump(
            {"input": str(prompts), "output_dir": str(store), "model": str(tiny_models["student"]),
             "max_completion_length": 4, "temperature": 0.0, "progress": False}
        )
    )  # fmt: skip
    for rank in ("1", "0"):
        result = subprocess.run(
            ["bash", str(REPO / "scripts" / "generate.sh"), "sample", str(config)],
            env=script_env(NNODES="2", NODE_RANK=rank),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in store.glob("manifest*.json")) == [
        "manifest-00000-of-00002.json",
        "manifest-00001-of-00002.json",
    ]
    rows = load_store(store)
    assert rows["input_index"] == [0, 1, 2, 3, 4]
    assert [r[0]["content"] if isinstance(r, list) else r for r in rows["prompt"]][0].startswith("sort: a b c d e")


@pytest.mark.slow
@pytest.mark.distributed
def test_train_sh_deepspeed_launcher_trains_on_two_processes(tiny_models, dist_data, deepspeed_ops, tmp_path):
    """scripts/train.sh with the deepspeed launcher runs `align-distill train` as one 2-process ZeRO-2 job: one
    optimizer step covers twice the per-process batch (epoch 0.5 of 8 rows with batch 2), and the model is saved."""
    rows = (dist_data / "sft.jsonl").read_text().splitlines()[:8]
    (tmp_path / "sft.jsonl").write_text("\n".join(rows) + "\n")
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"model_name_or_path": str(tiny_models["student"]), "dataset_name": str(tmp_path / "sft.jsonl"),
             "output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 2,
             "logging_steps": 1, "bf16": False, "save_strategy": "no", "max_length": 64, "disable_tqdm": True}
        )
    )  # fmt: skip
    env = {"LAUNCHER": "deepspeed", "ZERO": "zero2", "NPROC_PER_NODE": str(WORLD), "MASTER_PORT": str(free_port())}
    log = tmp_path / "train.log"
    try:
        with open(log, "w") as handle:
            result = subprocess.run(
                ["bash", str(REPO / "scripts" / "train.sh"), "sft", str(recipe)],
                env=script_env(**env),
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=LAUNCH_TIMEOUT,
            )
    finally:
        remove_shm_buffers(env["MASTER_PORT"])
    text = log.read_text()
    assert result.returncode == 0, text[-6000:]
    assert "'epoch': '0.5'" in text, text[-4000:]  # 4 of 8 rows in the one step: two processes, not one
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_gloo_fallback_only_for_launched_cpu_processes(monkeypatch):
    """Backend resolution on this CPU-only box: unchanged for a single process; gloo for a launched one (DDP as
    MULTI_CPU, DeepSpeed left to mark itself); and init_cpu_process_group is a no-op when not launched."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    from align_distill import distributed

    monkeypatch.setattr(PartialState, "_prepare_backend", PartialState._prepare_backend)  # restored afterwards
    for name in ("LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_cpu_process_group() is None
    distributed._install_gloo_fallback()
    distributed._install_gloo_fallback()  # idempotent: one wrapper, not two
    resolve = PartialState._prepare_backend
    assert resolve(object(), False, False, None) == (None, DistributedType.NO)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve(object(), False, False, None) == ("gloo", DistributedType.MULTI_CPU)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert resolve(object(), False, False, None) == ("gloo", DistributedType.NO)
    assert resolve(object(), True, False, None)[1] == DistributedType.MULTI_CPU  # cpu=True: accelerate's own answer


def test_gloo_fallback_refuses_an_unknown_accelerate_signature(monkeypatch):
    """The wrapped method is private: another signature (a new accelerate) stops with the fix instead of letting
    each rank train alone."""
    from accelerate.state import PartialState

    from align_distill import distributed

    def renamed(self, cpu=False, backend=None):  # e.g. a release that dropped `sagemaker_dp`
        return None, None

    monkeypatch.setattr(PartialState, "_prepare_backend", renamed)
    with pytest.raises(RuntimeError, match=r"accelerate>=1.10,<1.16"):
        distributed._install_gloo_fallback()
    assert PartialState._prepare_backend is renamed
