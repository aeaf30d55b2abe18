"""`align-distill train kd`: a YAML recipe runs end to end on CPU, prompt-only data trains on-policy, and a bad
config is one line."""

from __future__ import annotations

import json

import pytest
import yaml

from align_distill import synthetic
from align_distill.cli import main
from align_distill.commands import train_arguments
from align_distill.methods import METHODS
from align_distill.recipes import list_recipes
from align_distill.run_files import RUN_RECORD


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_train_kd_command_runs_two_steps_and_saves_a_student(tiny_models, tmp_path):
    assert "kd" in METHODS
    config = tmp_path / "kd.yaml"
    out = tmp_path / "student"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_models["student"]),
                "dataset_name": str(write_rows(tmp_path / "sft.jsonl", synthetic.sft_rows(8, seed=5))),
                "output_dir": str(out),
                "teacher_model_name_or_path": str(tiny_models["teacher"]),
                "divergence": "jsd",
                "beta": 0.5,
                "sft_weight": 0.1,
                "lmbda": 0.5,
                "max_completion_length": 6,
                "max_steps": 2,
                "per_device_train_batch_size": 4,
                "max_length": 64,
                "learning_rate": 1e-3,
                "gradient_checkpointing": False,
                "save_strategy": "no",
                "logging_steps": 1,
                "report_to": "none",
            }
        )
    )
    assert main(["train", "kd", "--config", str(config)]) == 0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["method"] == "kd" and record["args"]["KDConfig"]["divergence"] == "jsd"
    assert record["result"]["train_loss"] > 0


def test_prompt_only_data_trains_on_the_students_samples(tiny_models, tmp_path, run_method):
    prompts = write_rows(tmp_path / "prompts.jsonl", synthetic.prompt_rows(4, seed=5))
    metrics = run_method(
        "kd",
        model_name_or_path=str(tiny_models["student"]),
        dataset_name=str(prompts),
        teacher_model_name_or_path=str(tiny_models["teacher"]),
        lmbda=1.0,
        max_completion_length=4,
    )
    assert metrics["train_loss"] >= 0 and (tmp_path / "student" / "model.safetensors").exists()


def test_a_lora_student_trains_on_policy_and_saves_an_adapter(tiny_models, tmp_path, run_method):
    rows = write_rows(tmp_path / "sft.jsonl", synthetic.sft_rows(4, seed=6))
    run_method(
        "kd",
        model_name_or_path=str(tiny_models["student"]),
        dataset_name=str(rows),
        teacher_model_name_or_path=str(tiny_models["teacher"]),
        lmbda=1.0,
        max_completion_length=4,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
    )
    out = tmp_path / "student"
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            "teacher_mode: cache\nsignals_path: s\nlmbda: 0.5\n",
            "KDConfig: teacher_mode=cache is off-policy only (the cache holds the dataset's fixed completions), "
            "found lmbda=0.5; use teacher_mode=model or server for on-policy samples or set lmbda: 0",
        ),
        (
            "teacher_model_name_or_path: t\ndivergence: kl\n",
            "KDConfig: unknown divergence 'kl'; expected one of forward_kl, reverse_kl, jsd, skew_forward_kl, "
            "skew_reverse_kl, tvd, tvdpp, akl, taid",
        ),
        (
            "teacher_model_name_or_path: t\nloss_type: dft\n",
            "KDConfig: `loss_type` has no effect in KD (the SFT loss is replaced by the distillation loss; sft_weight "
            "adds the NLL); remove it",
        ),
    ],
    ids=["cache+lmbda", "unknown divergence", "ignored TRL field"],
)
def test_a_bad_config_is_one_line(tmp_path, capsys, settings, message):
    config = tmp_path / "kd.yaml"
    config.write_text(f"model_name_or_path: m\noutput_dir: {tmp_path / 'out'}\n{settings}")
    assert main(["train", "kd", "--config", str(config)]) == 2
    assert one_error_line(capsys) == f"error: {config}: {message}"


def test_the_shipped_recipes_parse(tmp_path):
    names = [name for name in list_recipes() if name.startswith("kd/")]
    assert names == [
        "kd/cache",
        "kd/draft_on_policy",
        "kd/draft_target_samples",
        "kd/multi_teacher",
        "kd/off_policy",
        "kd/on_policy",
        "kd/on_policy_vllm",
        "kd/server",
    ]
    parsed = {}
    for name in names:
        _, (data, training, model) = train_arguments("kd", ["--config", name, "--output_dir", str(tmp_path / name)])
        parsed[name] = training
        assert data.dataset_name and model.model_name_or_path
    assert parsed["kd/cache"].teacher_mode == "cache" and parsed["kd/cache"].divergence == "taid"
    assert parsed["kd/on_policy"].lmbda == 0.5 and parsed["kd/on_policy"].divergence_params() == {"beta": 0.5}
    assert parsed["kd/off_policy"].lmbda == 0.0 and parsed["kd/off_policy"].teacher_mode == "model"
    assert parsed["kd/server"].teacher_mode == "server" and len(parsed["kd/multi_teacher"].teachers) >= 2
    vllm = parsed["kd/on_policy_vllm"]
    assert vllm.rollout_backend == "vllm" and vllm.lmbda == 1.0 and vllm.rollout_sync_steps == 1
    assert vllm.rollout_backend_kwargs["gpu_memory_utilization"] == 0.3
