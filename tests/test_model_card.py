"""`align_distill.model_card`: the card is a `huggingface_hub.ModelCard` whose metadata parses back, shows no
absolute path of the training machine, summarises settings in short tables (no JSON dumps, no bookkeeping rows) and
cites the method's paper. Built from a hand-made pipeline run folder: no training, no model loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from align_distill.methods import METHODS
from align_distill.model_card import CITATIONS, render_card
from align_distill.provenance import collect_provenance

HUB_TOKEN = "hf_" + "Qw7" * 12
NOISE = (
    *("accelerator_config", "debug", "report_to", "logging_steps", "logging_dir", "dataloader_num_workers"),
    *("save_strategy", "save_steps", "disable_tqdm", "output_dir", "hub_token", "hub_model_id", "push_to_hub"),
)


def _write(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _stage(run: Path, name: str, kind: str, target: str, config: dict, result: object = None, when: int = 0):
    marker = _write(
        run / name / "stage.json",
        {
            "stage": name,
            "kind": kind,
            "target": target,
            "fingerprint": f"{when:x}" * 64,
            "config": config,
            "result": result,
        },
    )
    os.utime(marker, (1_700_000_000 + when, 1_700_000_000 + when))  # the order the run finished its stages


def make_fake_run(root: Path) -> Path:
    """A finished pipeline run under `root/home/me/runs/run`: data → signals (a local teacher) → a DCKD LoRA
    student (from a local base folder, with a hub teacher) → evaluation. The models live outside the run folder."""
    base = root / "home" / "me" / "models" / "student"
    teacher = root / "home" / "me" / "models" / "teacher"
    for folder in (base, teacher):
        _write(folder / "config.json", {"model_type": "qwen2"})
        (folder / "model.safetensors").write_bytes(b"weights of " + folder.name.encode())
    run = root / "home" / "me" / "runs" / "run"
    _write(run / "data" / "pairs.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    _stage(run, "data", "call", "align_distill.quickstart:write_data", {"n_pairs": 1}, when=1)
    _write(run / "signals" / "manifest.json", {"fingerprint_sha256": "f" * 64})
    signals = {
        "input": str(run / "data" / "pairs.jsonl"),
        "teachers": [{"name": "dpo", "model": str(teacher), "dtype": "bfloat16", "max_model_len": 2048}],
        "tokenizer": str(base),
        "top_k": 8,
        "temperature": 1.0,
        "progress": False,
    }
    _stage(run, "signals", "generate", "signals", signals, when=2)
    student = run / "student"
    _write(student / "adapter_config.json", {"base_model_name_or_path": str(base), "peft_type": "LORA", "r": 4})
    (student / "adapter_model.safetensors").write_bytes(b"adapter")
    _write(student / "tokenizer.json", {"version": "1.0"})
    _write(student / "tokenizer_config.json", {"pad_token": "<|endoftext|>"})
    (student / "training_args.bin").write_bytes(b"pickle " + HUB_TOKEN.encode())
    _write(student / "checkpoint-1" / "optimizer.pt", "state")
    versions = {"align-distill": "0.1.0", "torch": "2.9.0", "transformers": "5.0.0", "trl": "1.16.0", "peft": "0.18.0"}
    _write(student / "align_distill_run.json", {"method": "dckd", "args": {}, "framework_versions": versions})
    config = {
        "model_name_or_path": str(base),
        "dataset_name": str(run / "data" / "pairs.jsonl"),
        "signals_path": str(run / "signals"),
        "teacher_model_name_or_path": "Org/teacher-7b",
        "teacher_revision": "abc123",
        "output_dir": str(student),
        "deepspeed_config_file": str(root / "home" / "me" / "zero3.json"),
        "use_peft": True,
        "lora_r": 4,
        "learning_rate": 0.001,
        "beta": 0.1,
        "max_new_tokens": 128,
        "lora_target_modules": ["q_proj", "v_proj"],
        "report_to": ["none"],
        "logging_steps": 1,
        "logging_dir": str(student / "logs"),
        "accelerator_config": {"split_batches": False, "dispatch_batches": None},
        "debug": [],
        "dataloader_num_workers": 0,
        "save_strategy": "steps",
        "save_steps": 1,
        "disable_tqdm": True,
        "push_to_hub": False,
        "hub_model_id": "my-org/x",
        "hub_token": HUB_TOKEN,
    }
    result = {"train_loss": 0.5, "mean_token_accuracy": 0.625, "train_runtime": 1.5, "total_flos": 10.0}
    _stage(run, "student", "train", "dckd", config, result, when=3)
    evaluation = {"student_dckd": {"reward": 0.75, "accuracy": 0.5}, "base": {"reward": 0.25, "accuracy": 0.125}}
    _write(run / "evaluate" / "eval.json", evaluation)
    _stage(run, "evaluate", "call", "eval", {"models": {"student_dckd": str(student), "base": str(base)}}, when=4)
    return run


@pytest.fixture
def fake_run(tmp_path) -> Path:
    return make_fake_run(tmp_path)


def _card(run: Path, **changes) -> tuple[str, dict]:
    provenance = collect_provenance(run)
    provenance.update(changes)
    return render_card(provenance, "my-org/tiny-dckd", license="apache-2.0"), provenance


def test_card_metadata_parses_back(fake_run):
    card, _ = _card(fake_run, published_base_model="my-org/tiny-base")
    data = ModelCard(card).data
    assert data.base_model == "my-org/tiny-base" and data.base_model_relation == "adapter"
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation" and data.license == "apache-2.0"
    assert {"align-distill", "dckd", "lora"} <= set(data.tags)
    assert "Org/teacher-7b@abc123" in data.teachers and "local:teacher" in data.teachers
    # model-index: this model's numbers from the evaluation stage
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"reward": 0.75, "accuracy": 0.5}
    assert data.model_name == "tiny-dckd" and data.eval_results[0].task_type == "text-generation"
    # the body: framework versions, the method's paper, the teachers
    assert "## Framework versions" in card and "- trl: 1.16.0" in card and "- align-distill: 0.1.0" in card
    assert "@inproceedings{gao2025advantage" in card and "Advantage-Guided Distillation" in card
    assert "| signals: signals teacher dpo | local:teacher |" in card
    assert "| teacher_model_name_or_path | Org/teacher-7b@abc123 | revision abc123 |" in card


def test_model_index_takes_the_evaluate_stage_that_evaluated_this_model(fake_run):
    """An `evaluate` stage (models as `{model: path}` specs, a prompt set, judge win-rates) that evaluated this
    student wins over an older evaluation that did not; its numbers fill the model-index."""
    student = fake_run / "student"
    evaluation = {"student_dckd": {"win_rate": 0.625, "lc_win_rate": 0.6, "n": 8}, "teacher": {"n": 8}}
    _write(fake_run / "judged" / "eval.json", evaluation)
    config = {
        "prompts": str(fake_run / "data" / "held_out.jsonl"),
        "models": {"teacher": {"model": "Org/teacher-7b"}, "student_dckd": {"model": str(student)}},
        "baseline": "teacher",
    }
    _stage(fake_run, "judged", "evaluate", "inline", config, when=5)
    (fake_run / "evaluate" / "eval.json").write_text(json.dumps({"other": {"reward": 0.1}}))
    _stage(fake_run, "evaluate", "call", "eval", {"models": {"other": "Org/other"}}, when=4)
    card, provenance = _card(fake_run)
    assert provenance["evaluation"]["this_model"] == "student_dckd"
    results = {r.metric_type: r.metric_value for r in ModelCard(card).data.eval_results}
    assert results == {"win_rate": 0.625, "lc_win_rate": 0.6, "n": 8}
    assert ModelCard(card).data.eval_results[0].dataset_name == "data/held_out.jsonl (judged/eval.json)"


def test_card_shows_no_local_path_no_json_dump_and_no_bookkeeping(fake_run, tmp_path):
    card, provenance = _card(fake_run, published_base_model="local:student")  # as hub.stage_publication sets it
    record = json.dumps(provenance)
    for text in (card, record):
        assert str(tmp_path) not in text and "/home/me" not in text
        assert HUB_TOKEN not in text
    # paths inside the run are relative to it; the rest are named only
    assert "| dataset_name | data/pairs.jsonl | sha256:" in card
    assert "| signals_path | signals | store:" + "f" * 64 + " |" in card
    assert "local:student" in card and provenance["hyperparameters"]["deepspeed_config_file"] == "local:zero3.json"
    # the adapter's base is a local folder: named, and the card says how to load the adapter
    assert "`local:student`, a folder of the training machine" in card
    # key settings in short tables: no JSON dump, no bookkeeping rows
    body = card.split("\n---\n", 1)[1]
    assert '{"' not in body and "[{" not in body
    for noise in NOISE:
        assert f"| {noise} |" not in card, noise
    assert "| lora_r | 4 |" in card and "| learning_rate | 0.001 |" in card and "| beta | 0.1 |" in card
    assert "| max_new_tokens | 128 |" in card and "| lora_target_modules | q_proj, v_proj |" in card
    assert "| use_peft | true |" in card
    assert "| signals model teacher" not in card
    assert "| signals teacher dpo | local:teacher (dtype=bfloat16, max_model_len=2048) |" in card
    assert "| top_k | 8 |" in card
    # metric names are not secrets; timing bookkeeping is left out of the result table
    assert "| mean_token_accuracy | 0.625 |" in card and "train_runtime" not in card and "total_flos" not in card
    assert "| **student_dckd** | 0.5 | 0.75 |" in card


def test_full_vision_model_card_without_evaluation():
    provenance = {
        "align_distill_version": "0.1.0",
        "method": "mod",
        "format": "model",
        "stage": None,
        "pipeline_tag": "image-text-to-text",
        "hyperparameters": {"learning_rate": 2e-5, "mod_stage": "d2s"},
        "student": {
            "trained_from": {"hub_id": "Org/vlm-small", "revision": "r1"},
            "base": {"hub_id": "Org/vlm-small", "revision": "r1"},
            "chain": "Org/vlm-small@r1",
        },
        "teachers": [],
        "datasets": [{"role": "dataset_name", "hub_id": "Org/vqa"}],
        "data_gen": [],
        "evaluation": None,
        "training_result": None,
        "stages": {},
        "framework_versions": {"trl": "1.16.0"},
    }
    card = render_card(provenance, "my-org/vlm-mod")
    data = ModelCard(card).data
    assert data.base_model == "Org/vlm-small" and data.get("base_model_relation") is None
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
    assert data.datasets == ["Org/vqa"] and data.eval_results is None and data.license is None
    assert "AutoModelForImageTextToText" in card and "LLaVA-MoD: Making LLaVA Tiny" in card


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_cites_its_paper(method):
    titles = {
        "sft": "TRL: Transformer Reinforcement Learning",
        "dpo": "Direct Preference Optimization",
        "dckd": "Advantage-Guided Distillation for Preference Alignment in Small Language Models",
        "adpa": "Advantage-Guided Distillation for Preference Alignment in Small Language Models",
        "aligndistil": "AlignDistil: Token-Level Language Model Alignment as Adaptive Policy Distillation",
        "mod": "LLaVA-MoD: Making LLaVA Tiny via MoE Knowledge Distillation",
        "cyclealign": "CycleAlign: Iterative Distillation from Black-box LLM to White-box Models",
        "kd": "On-Policy Distillation of Language Models",
    }
    assert any(titles[method] in entry for entry in CITATIONS[method])
