"""DCKDTrainer on tiny models: cache and live teachers train, cache == live on one batch, mismatches raise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align_distill import synthetic
from align_distill.data import load_dataset_for
from align_distill.models import load_model
from align_distill.trainers.dckd import DCKDConfig, DCKDTrainer
from align_distill.trainers.signals import SignalsMismatchError, TeacherSignalReader

ROWS = 8


def write_pairs(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def make_signals(pairs: Path, out: Path, teachers: list[dict], top_k: int, responses=None) -> Path:
    from align_distill.data_gen import run_job

    config = {
        "input": str(pairs),
        "output_dir": str(out),
        "teachers": teachers,
        "signals_top_k": top_k,
        "progress": False,
    }
    if responses:
        config["responses"] = responses
    return run_job("signals", config)


def tiny_args(cls, out: Path, **overrides):
    settings = dict(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        learning_rate=1e-2,
        max_length=64,
        dataloader_pin_memory=False,
        seed=0,
    )
    return cls(**{**settings, **overrides})


def changed_parameters(before: dict[str, torch.Tensor], model: torch.nn.Module) -> int:
    return sum(not torch.equal(before[name], p.detach()) for name, p in model.named_parameters())


@pytest.fixture(scope="module")
def dckd_data(tiny_models, tmp_path_factory):
    """Preference pairs, and the DPO teacher's signals on them at k = 8 and at k = V (full vocabulary)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("dckd")
    pairs = write_pairs(root / "pairs.jsonl", synthetic.preference_rows(ROWS, seed=1))
    teacher = [{"name": "dpo", "model": str(tiny_models["teacher"])}]
    vocab = len(AutoTokenizer.from_pretrained(tiny_models["tokenizer"]))
    return {
        "root": root,
        "pairs": pairs,
        "signals": make_signals(pairs, root / "signals_k8", teacher, top_k=8),
        "signals_full": make_signals(pairs, root / "signals_full", teacher, top_k=vocab),
    }


def build(tiny_models, tiny_tokenizer, data_path, out, teacher=None, evaluate=False, **overrides):
    dataset = load_dataset_for(str(data_path), "preference")
    model = load_model(tiny_models["student"], dtype="float32")
    args = tiny_args(DCKDConfig, out, **overrides)
    return DCKDTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(4)) if evaluate else None,
        processing_class=tiny_tokenizer,
        teacher_model=teacher,
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["paper", "official"])
def test_cache_mode_trains_and_logs_each_part(tiny_models, tiny_tokenizer, dckd_data, tmp_path, mode):
    trainer = build(
        tiny_models,
        tiny_tokenizer,
        dckd_data["pairs"],
        tmp_path,
        signals_path=str(dckd_data["signals"]),
        loss_mode=mode,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert changed_parameters(before, trainer.model) == len(before)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for entry in logged:
        assert entry["loss/sft"] > 0 and entry["kl/chosen"] > 0 and entry["kl/rejected"] > 0
        expected = entry["loss/sft"] + 0.1 * entry["kl/chosen"] + 0.1 * entry["kl/rejected"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_live_mode_trains(tiny_models, tiny_tokenizer, dckd_data, tmp_path):
    trainer = build(
        tiny_models,
        tiny_tokenizer,
        dckd_data["pairs"],
        tmp_path,
        teacher_mode="model",
        teacher_model_name_or_path=str(tiny_models["teacher"]),
        rejected_kl_weight=0.0,
    )
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert changed_parameters(before, trainer.model) == len(before)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("kl/chosen" in h and "kl/rejected" not in h for h in logged)


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_cached_signals_at_full_vocabulary_give_the_live_loss(tiny_models, tiny_tokenizer, dckd_data, tmp_path, mode):
    """k = V: the top-k + rest KL of the cache is the live teacher's full-vocabulary KL (up to the cache's fp16)."""
    cache = build(
        tiny_models,
        tiny_tokenizer,
        dckd_data["pairs"],
        tmp_path / "c",
        signals_path=str(dckd_data["signals_full"]),
        loss_mode=mode,
    )
    live = build(
        tiny_models,
        tiny_tokenizer,
        dckd_data["pairs"],
        tmp_path / "l",
        teacher_mode="model",
        loss_mode=mode,
        teacher_model_name_or_path=str(tiny_models["teacher"]),
        signals_top_k=len(tiny_tokenizer),
    )
    batch = cache.data_collator([cache.train_dataset[i] for i in range(4)])
    assert batch["teacher_ids"].shape[-1] == len(tiny_tokenizer)
    cache.model.train(), live.model.train()  # metrics go to the "train" bucket (dropout is off in both)
    with torch.no_grad():
        cached_loss = cache.compute_loss(cache.model, batch)
        live_loss = live.compute_loss(
            live.model, {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
        )
    metrics = {key: cache._metrics["train"][key][-1] for key in ("kl/chosen", "kl/rejected")}
    live_metrics = {key: live._metrics["train"][key][-1] for key in ("kl/chosen", "kl/rejected")}
    for key in metrics:
        assert metrics[key] == pytest.approx(live_metrics[key], rel=2e-2, abs=1e-5)
    assert cached_loss.item() == pytest.approx(live_loss.item(), rel=1e-4)


def test_evaluate_logs_the_loss_parts(tiny_models, tiny_tokenizer, dckd_data, tmp_path):
    trainer = build(
        tiny_models,
        tiny_tokenizer,
        dckd_data["pairs"],
        tmp_path,
        evaluate=True,
        signals_path=str(dckd_data["signals"]),
    )
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and metrics["eval_kl/chosen"] > 0 and metrics["eval_loss/sft"] > 0


def test_a_changed_response_is_an_error_naming_the_row(tiny_models, tiny_tokenizer, dckd_data, tmp_path):
    rows = synthetic.preference_rows(ROWS, seed=1)
    rows[3]["chosen"] = [{"role": "assistant", "content": "sure, a b c d"}]
    edited = write_pairs(tmp_path / "edited.jsonl", rows)
    with pytest.raises(SignalsMismatchError, match=r"row 'pref-1-3' \(data row 4\): chosen ids differ"):
        build(tiny_models, tiny_tokenizer, edited, tmp_path, signals_path=str(dckd_data["signals"]))
    rows = synthetic.preference_rows(ROWS + 1, seed=1)
    more = write_pairs(tmp_path / "more.jsonl", rows)
    with pytest.raises(SignalsMismatchError, match="row 'pref-1-8' .* is not in the signals cache"):
        build(tiny_models, tiny_tokenizer, more, tmp_path, signals_path=str(dckd_data["signals"]))


def test_a_batch_whose_tokens_differ_from_the_cache_raises(tiny_models, tiny_tokenizer, dckd_data, tmp_path):
    trainer = build(tiny_models, tiny_tokenizer, dckd_data["pairs"], tmp_path, signals_path=str(dckd_data["signals"]))
    examples = [trainer.train_dataset[i] for i in range(2)]
    examples[1] = {**examples[1], "id": examples[0]["id"]}  # row 1's tokens under row 0's id
    with pytest.raises(SignalsMismatchError, match=f"row '{examples[0]['id']}': the batch's chosen tokens"):
        trainer.data_collator(examples)
    reader = TeacherSignalReader(dckd_data["signals"], ["dpo"], ["chosen"])
    with pytest.raises(SignalsMismatchError, match=r"needs teachers \['ref'\]"):
        TeacherSignalReader(dckd_data["signals"], ["ref"], ["chosen"])
    assert reader.top_k == 8


def test_config_checks_the_teacher_source(tmp_path):
    with pytest.raises(ValueError, match="teacher_mode=cache needs signals_path"):
        tiny_args(DCKDConfig, tmp_path)
    with pytest.raises(ValueError, match="teacher_mode=model needs teacher_model_name_or_path"):
        tiny_args(DCKDConfig, tmp_path, teacher_mode="model")


@pytest.mark.slow
def test_train_dckd_command_saves_a_student(tiny_models, dckd_data, tmp_path, run_method):
    metrics = run_method(
        "dckd",
        model_name_or_path=str(tiny_models["student"]),
        dataset_name=str(dckd_data["pairs"]),
        signals_path=str(dckd_data["signals"]),
    )
    assert metrics["train_loss"] > 0
    assert (tmp_path / "student" / "model.safetensors").exists() and (tmp_path / "student" / "tokenizer.json").exists()
