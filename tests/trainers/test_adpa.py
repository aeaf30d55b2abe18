"""ADPATrainer on tiny models: the advantage term sees the student's rollouts, cache and live teachers train and
agree on one batch, regeneration replaces the responses, mismatches raise."""

from __future__ import annotations

import pytest
import torch

from align_distill import synthetic
from align_distill.models import load_model
from align_distill.trainers.adpa import ADPAConfig, ADPATrainer
from align_distill.trainers.signals import SignalsMismatchError
from tests.trainers.test_dckd import ROWS, changed_parameters, make_signals, tiny_args, write_pairs


@pytest.fixture(scope="module")
def adpa_data(tiny_models, tmp_path_factory):
    """A greedy student rollout of the pairs' prompts, and the DPO teacher (tiny teacher) + reference (tiny student)
    signals on it: reference gathered at the DPO ids (paper, k = 8 and k = V) and with its own top-k (official)."""
    from transformers import AutoTokenizer

    from align_distill.data_gen import run_job

    root = tmp_path_factory.mktemp("adpa")
    pairs = write_pairs(root / "pairs.jsonl", synthetic.preference_rows(ROWS, seed=1))
    rollout = run_job(
        "rollout",
        {
            "input": str(pairs),
            "output_dir": str(root / "rollout"),
            "model": str(tiny_models["student"]),
            "max_completion_length": 10,
            "progress": False,
        },
    )
    dpo = {"name": "dpo", "model": str(tiny_models["teacher"])}
    ref = {"name": "ref", "model": str(tiny_models["student"])}
    vocab = len(AutoTokenizer.from_pretrained(tiny_models["tokenizer"]))
    gathered = [dpo, {**ref, "gather_at": "dpo"}]
    return {
        "root": root,
        "rollout": rollout,
        "signals": make_signals(rollout, root / "sig_k8", gathered, 8, ["completion"]),
        "signals_full": make_signals(rollout, root / "sig_full", gathered, vocab, ["completion"]),
        "signals_own": make_signals(rollout, root / "sig_own", [dpo, ref], 8, ["completion"]),
    }


def build(tiny_models, tiny_tokenizer, store, out, **overrides):
    from align_distill.data_gen import load_store

    model = load_model(tiny_models["student"], dtype="float32")
    args = tiny_args(ADPAConfig, out, **overrides)
    return ADPATrainer(model=model, args=args, train_dataset=load_store(store), processing_class=tiny_tokenizer)


def live_settings(tiny_models, **overrides):
    return dict(
        teacher_mode="model",
        teacher_model_name_or_path=str(tiny_models["teacher"]),
        reference_model_name_or_path=str(tiny_models["student"]),
        **overrides,
    )


def test_the_advantage_term_sees_the_student_rollouts(tiny_models, tiny_tokenizer, adpa_data, tmp_path):
    from align_distill.data_gen import load_store

    trainer = build(
        tiny_models, tiny_tokenizer, adpa_data["signals"], tmp_path, signals_path=str(adpa_data["signals"])
    )
    rollout = {row["id"]: row for row in load_store(adpa_data["rollout"])}
    examples = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(examples)
    half = batch["input_ids"].shape[0] // 2
    for n, example in enumerate(examples):
        chosen_row, student_row = batch["input_ids"][n], batch["input_ids"][half + n]
        chosen_mask, student_mask = batch["completion_mask"][n].bool(), batch["completion_mask"][half + n].bool()
        # first half: the dataset's chosen response (SFT); second half: the student's own generation
        assert chosen_row[chosen_mask].tolist() == example["chosen_ids"]
        assert student_row[student_mask].tolist() == rollout[example["id"]]["completion_ids"]
        assert student_row[student_mask].tolist() != example["chosen_ids"]
    # the teacher signals sit on the student-response rows only
    assert batch["dpo_ids"].shape[0] == half and batch["dpo_ids"].shape[-1] == 8
    # the advantage term reads the signals of the student-response rows; the SFT term does not
    trainer.model.train()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
        swapped = {**batch, "dpo_ids": batch["dpo_ids"].roll(1, dims=-1)}
        trainer.compute_loss(trainer.model, swapped)
    metrics = trainer._metrics["train"]
    assert metrics["loss/sft"][0] == metrics["loss/sft"][1]
    assert metrics["loss/adpa"][0] != metrics["loss/adpa"][1]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "signals"), [("paper", "signals"), ("official", "signals_own")])
def test_cache_mode_trains_and_logs(tiny_models, tiny_tokenizer, adpa_data, tmp_path, mode, signals):
    trainer = build(
        tiny_models, tiny_tokenizer, adpa_data[signals], tmp_path, signals_path=str(adpa_data[signals]), loss_mode=mode
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert changed_parameters(before, trainer.model) == len(before)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for entry in logged:
        assert entry["loss"] == pytest.approx(entry["loss/sft"] + 1.6 * entry["loss/adpa"], rel=1e-4)
        assert entry["adpa/expected_advantage"] == pytest.approx(-entry["loss/adpa"])
        assert {"adpa/advantage_mean", "adpa/token_advantage", "adpa/rollout_tokens"} <= set(entry)
    if mode == "official":  # clipped advantages: the expected advantage is positive
        assert all(entry["adpa/expected_advantage"] > 0 for entry in logged)


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_cached_signals_at_full_vocabulary_give_the_live_loss(tiny_models, tiny_tokenizer, adpa_data, tmp_path, mode):
    signals = adpa_data["signals_full"]
    cache = build(tiny_models, tiny_tokenizer, signals, tmp_path / "c", signals_path=str(signals), loss_mode=mode)
    live = build(
        tiny_models,
        tiny_tokenizer,
        signals,
        tmp_path / "l",
        **live_settings(tiny_models, loss_mode=mode),
        signals_top_k=len(tiny_tokenizer),
    )
    batch = cache.data_collator([cache.train_dataset[i] for i in range(4)])
    cache.model.train(), live.model.train()
    with torch.no_grad():
        cached_loss = cache.compute_loss(cache.model, batch)
        live_loss = live.compute_loss(
            live.model, {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
        )
    for key in ("loss/adpa", "adpa/token_advantage", "adpa/advantage_mean"):
        assert cache._metrics["train"][key][-1] == pytest.approx(live._metrics["train"][key][-1], rel=2e-2, abs=1e-4)
    assert cached_loss.item() == pytest.approx(live_loss.item(), rel=1e-3)


@pytest.mark.slow
def test_live_mode_regenerates_student_responses(tiny_models, tiny_tokenizer, adpa_data, tmp_path):
    trainer = build(
        tiny_models,
        tiny_tokenizer,
        adpa_data["rollout"],
        tmp_path,
        **live_settings(tiny_models, rollout_steps=2, max_completion_length=4),
        max_steps=3,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert changed_parameters(before, trainer.model) == len(before)
    lengths = [h["adpa/rollout_tokens"] for h in trainer.state.log_history if "loss" in h]
    # steps 0 and 2 train on fresh 4-token responses, step 1 on the 10-token initial rollout
    assert lengths[0] <= 4 and lengths[2] <= 4 and lengths[1] > 4


def test_errors_name_what_is_wrong(tiny_models, tiny_tokenizer, adpa_data, tmp_path):
    with pytest.raises(ValueError, match="gathered at the DPO teacher's ids"):
        build(
            tiny_models, tiny_tokenizer, adpa_data["signals_own"], tmp_path, signals_path=str(adpa_data["signals_own"])
        )
    with pytest.raises(ValueError, match="rollout_steps > 0 .* use teacher_mode=model or server"):
        tiny_args(ADPAConfig, tmp_path, signals_path="x", rollout_steps=1)
    # a rollout that is not the one the signals were computed on
    from align_distill.data_gen import load_store

    rows = load_store(adpa_data["rollout"])
    other = rows.map(
        lambda row, i: {"completion_ids": row["completion_ids"][:-1] if i == 2 else row["completion_ids"]},
        with_indices=True,
    )
    args = tiny_args(ADPAConfig, tmp_path, signals_path=str(adpa_data["signals"]))
    with pytest.raises(SignalsMismatchError, match=f"row '{rows[2]['id']}' \\(data row 3\\): completion ids differ"):
        ADPATrainer(
            model=load_model(tiny_models["student"], dtype="float32"),
            args=args,
            train_dataset=other,
            processing_class=tiny_tokenizer,
        )


@pytest.mark.slow
def test_train_adpa_command_joins_chosen_by_row_id(tiny_models, adpa_data, tmp_path, run_method):
    from align_distill.methods import method_module

    module = method_module("adpa")
    store = adpa_data["signals"]
    metrics = run_method(
        "adpa",
        model_name_or_path=str(tiny_models["student"]),
        signals_path=str(store),  # also the training rows (the signals job kept prompt, chosen, completion_ids)
        preference_path=str(adpa_data["root"] / "pairs.jsonl"),
    )
    assert metrics["train_loss"] > 0
    assert (tmp_path / "student" / "model.safetensors").exists()
    rows = module.load_rows(str(store))
    with pytest.raises(SystemExit, match="no preference row"):
        module.join_chosen(rows, str(adpa_data["root"] / "pairs.jsonl"), "train").map(lambda r: r)  # all present
        module.join_chosen(rows.map(lambda r: {"id": r["id"] + "-x"}), str(adpa_data["root"] / "pairs.jsonl"), "train")


def test_train_adpa_checks_response_rows_before_training(tiny_models, adpa_data, tmp_path, run_method):
    """Duplicate ids and out-of-vocabulary ids in the rollout rows stop `train adpa` with the row named, before the
    student loads (they used to train, or crash inside compute_loss)."""
    from align_distill.data import DataValidationError
    from align_distill.methods import method_module

    rows = method_module("adpa").load_rows(str(adpa_data["rollout"])).to_list()
    rows[1]["id"] = rows[0]["id"]
    rows[2]["completion_ids"] = [10**9]
    path = write_pairs(tmp_path / "rollout.jsonl", rows)
    with pytest.raises(DataValidationError) as error:
        run_method(
            "adpa",
            model_name_or_path=str(tiny_models["student"]),
            dataset_name=str(path),
            teacher_mode="model",
            teacher_model_name_or_path=str(tiny_models["teacher"]),
            reference_model_name_or_path=str(tiny_models["student"]),
        )
    assert "rollout.jsonl:row 2:column id: id" in str(error.value)
    assert "rollout.jsonl:row 3:column completion_ids: token id 1000000000 is outside" in str(error.value)
    assert not (tmp_path / "student").exists()


@pytest.mark.slow
def test_served_teacher_and_reference_give_the_in_process_loss(tiny_models, tiny_tokenizer, adpa_data, tmp_path):
    """Paper mode: the reference's server is asked for its full vocabulary and read at the DPO teacher's ids."""
    from tests.teachers.teacher_server import TeacherServer

    servers = [
        TeacherServer(load_model(tiny_models[name], dtype="float32", frozen=True), tiny_tokenizer)
        for name in ("teacher", "student")
    ]
    try:
        rollout = adpa_data["rollout"]
        in_process = build(tiny_models, tiny_tokenizer, rollout, tmp_path / "m", **live_settings(tiny_models))
        served = build(
            tiny_models, tiny_tokenizer, adpa_data["rollout"], tmp_path / "s", teacher_mode="server",
            teacher_server_url=servers[0].url, reference_server_url=servers[1].url,
        )  # fmt: skip
        examples = [in_process.train_dataset[i] for i in range(4)]
        losses = []
        for trainer in (in_process, served):
            trainer.model.train()
            with torch.no_grad():
                losses.append(trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item())
        assert losses[1] == pytest.approx(losses[0], abs=1e-5)
        assert servers[1].completions > 0  # the reference was asked (gathered at the teacher's ids)
    finally:
        for server in servers:
            server.stop()
