"""LLaVA-MoD trainers on text models (docs/methods/llava_mod.md §4-§5):
mimic d2d / d2s, preference with teacher reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset

from align_distill import synthetic
from align_distill.errors import ConfigError
from align_distill.losses import kd_loss, moe_balancing_loss, sequence_logps, teacher_ref_preference_loss
from align_distill.models import load_model, load_tokenizer
from align_distill.models.moe import d2s_parameter_names, upcycle_to_moe
from align_distill.trainers.common import response_view
from align_distill.trainers.mod_mimic import MoDMimicConfig, MoDMimicTrainer, RouterLogits
from align_distill.trainers.mod_preference import MoDPreferenceConfig, MoDPreferenceTrainer

COMMON = dict(
    output_dir="unused",
    max_steps=2,
    per_device_train_batch_size=4,
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    max_length=64,
    dataloader_num_workers=0,
    disable_tqdm=True,
    dataloader_pin_memory=False,
)


@pytest.fixture(scope="module")
def models(tiny_models):
    tokenizer = load_tokenizer(tiny_models["student"])
    teacher = load_model(tiny_models["teacher"], dtype="float32", frozen=True)
    student = load_model(tiny_models["student"], dtype="float32")
    return tokenizer, teacher, student


def sft_data(n=8):
    return Dataset.from_list(synthetic.sft_rows(n, seed=0))


def pair_data(n=8):
    return Dataset.from_list(synthetic.preference_rows(n, seed=1))


def snapshot(model):
    """A copy of every parameter, to see later which ones training changed."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed_names(model, before):
    return {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}


def _logged(trainer, key):
    return [log[key] for log in trainer.state.log_history if key in log]


def _mimic(student, teacher, tokenizer, tmp_path, **config):
    args = MoDMimicConfig(**{**COMMON, "output_dir": str(tmp_path), "learning_rate": 1e-2, **config})
    return MoDMimicTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=sft_data(), processing_class=tokenizer
    )


def _one_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


# ---------------------------------------------------------------- stage 1: mimic


@pytest.mark.slow
def test_d2d_trains_the_whole_model_with_kd_only(models, tmp_path):
    tokenizer, teacher, student = models
    student = copy.deepcopy(student)
    trainer = _mimic(student, teacher, tokenizer, tmp_path, stage="d2d")
    assert trainer.args.sft_weight == 0.0
    assert all(p.requires_grad for p in student.parameters())
    before = snapshot(student)
    trainer.train()
    assert changed_names(student, before) == set(before)  # dense: every parameter moves
    kd = _logged(trainer, "kd_loss")
    assert len(kd) == 2 and all(math.isfinite(v) and v > 0 for v in kd)
    assert _logged(trainer, "loss") == pytest.approx(kd, rel=1e-5)  # loss = KD, nothing else
    assert not _logged(trainer, "ce_loss") and not _logged(trainer, "aux_loss")


def test_mimic_loss_is_forward_kl_on_response_tokens(models, tmp_path):
    """The trainer's loss on a batch equals kd_loss(student, teacher) over the shifted completion mask; a teacher
    identical to the student gives exactly 0."""
    tokenizer, teacher, student = models
    trainer = _mimic(copy.deepcopy(student), teacher, tokenizer, tmp_path, stage="d2d")
    batch = _one_batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        s = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, _, mask = response_view(s, batch["input_ids"], batch["labels"] != -100)
    # the mask covers the completion tokens (those with a label), never the prompt or padding
    assert mask.sum() == (batch["labels"] != -100).sum() - (batch["labels"][:, 0] != -100).sum()
    expected = kd_loss(logits, t[:, :-1], mask, divergence="forward_kl")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    self_teacher = copy.deepcopy(student).eval()
    same = _mimic(copy.deepcopy(student), self_teacher, tokenizer, tmp_path, stage="d2d")
    assert same.compute_loss(same.model, dict(_one_batch(same))).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_d2s_trains_only_ffn_experts_routers_with_kd_ce_balancing(models, tmp_path):
    tokenizer, teacher, student = models
    moe = upcycle_to_moe(copy.deepcopy(student), num_experts=4, top_k=2, every=2)
    trainer = _mimic(moe, teacher, tokenizer, tmp_path, stage="d2s")
    trainable = set(d2s_parameter_names(moe))
    assert {n for n, p in moe.named_parameters() if p.requires_grad} == trainable
    assert any(".mlp.gate." in n for n in trainable) and any(".mlp.experts." in n for n in trainable)
    assert not any("self_attn" in n or "embed" in n or "norm" in n for n in trainable)
    before = snapshot(moe)
    trainer.train()
    changed = changed_names(moe, before)
    frozen = set(before) - trainable
    assert frozen and not (changed & frozen)  # frozen parameters are bit-for-bit unchanged
    assert any(".mlp.gate." in n for n in changed) and any(".mlp.experts." in n for n in changed)
    logs = trainer.state.log_history[0]
    assert trainer.args.sft_weight == 1.0
    assert logs["loss"] == pytest.approx(logs["kd_loss"] + logs["ce_loss"] + 0.01 * logs["aux_loss"], rel=1e-4)
    assert logs["aux_loss"] >= 1.0 - 1e-6  # ℓ_aux ≥ 1 per layer (= 1 only when perfectly balanced); one MoE layer


def test_router_logits_and_balancing_loss_follow_the_spec(models):
    """The recorded router logits are the model's own (`output_router_logits`), and the loss is
    the method page's ℓ_aux."""
    tokenizer, _, student = models
    moe = upcycle_to_moe(copy.deepcopy(student), every=1).eval()
    recorder = RouterLogits(moe)
    assert len(recorder.routers) == moe.config.num_hidden_layers and (recorder.num_experts, recorder.top_k) == (4, 2)
    ids = tokenizer(["sort: a b c", "reverse: d c"], return_tensors="pt", padding=True)
    with torch.no_grad(), recorder:
        out = moe(**ids, output_router_logits=True)
    assert len(recorder.logits) == len(out.router_logits)
    assert all(torch.equal(a, b) for a, b in zip(recorder.logits, out.router_logits))
    with torch.no_grad():
        moe(**ids)
    assert len(recorder.logits) == len(out.router_logits)  # nothing recorded outside `with`
    loss = moe_balancing_loss(recorder.logits, 2, 4, attention_mask=ids["attention_mask"])
    assert loss.item() >= moe.config.num_hidden_layers * (1 - 1e-6)


# ---------------------------------------------------------------- stage 2: preference with the teacher as reference


def _preference(student, teacher, tokenizer, tmp_path, data=None, **config):
    args = MoDPreferenceConfig(**{**COMMON, "output_dir": str(tmp_path), "learning_rate": 1e-3, **config})
    return MoDPreferenceTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=data if data is not None else pair_data(),
        processing_class=tokenizer,
    )


def _sequence_logps(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    aligned, labels, mask = response_view(logits, batch["input_ids"], batch["completion_mask"])
    return sequence_logps(aligned, labels, mask).chunk(2)


@pytest.mark.parametrize("loss_type", ["sigmoid", "kto_pair"])
def test_preference_loss_is_teacher_referenced(models, tmp_path, loss_type):
    """Step-0 loss = teacher_ref_preference_loss of summed log-probs computed independently (full logits)."""
    tokenizer, teacher, student = models
    trainer = _preference(copy.deepcopy(student), teacher, tokenizer, tmp_path, loss_type=loss_type)
    assert trainer.ref_model is not None and trainer.args.beta == 0.1
    batch = _one_batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    chosen, rejected = _sequence_logps(trainer.model, batch)
    t_chosen, t_rejected = _sequence_logps(teacher, batch)
    expected, *_ = teacher_ref_preference_loss(chosen, rejected, t_chosen, t_rejected, beta=0.1, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    if loss_type == "sigmoid":
        assert loss.item() != pytest.approx(math.log(2), abs=1e-4)  # the reference is not the student's init


@pytest.mark.slow
def test_preference_precomputed_teacher_is_freed_and_moe_student_trains_d2s_set(models, tmp_path):
    tokenizer, teacher, student = models
    moe = upcycle_to_moe(copy.deepcopy(student))
    trainer = _preference(moe, teacher, tokenizer, tmp_path, precompute_ref_log_probs=True, loss_type="kto_pair")
    assert trainer.ref_model is None  # teacher log-probs live in the dataset now
    assert set(trainer.train_dataset.column_names) >= {"ref_chosen_logps", "ref_rejected_logps"}
    trainable = set(d2s_parameter_names(moe))
    before = snapshot(moe)
    trainer.train()
    changed = changed_names(moe, before)
    assert changed and changed <= trainable
    logs = trainer.state.log_history[0]
    for key in ("aux_loss", "sft_loss", "rewards/chosen", "rewards/margins", "teacher_logps/chosen"):
        assert math.isfinite(logs[key])
    assert logs["aux_loss"] >= 2.0 - 1e-5  # chosen pass + rejected pass, ≥ 1 each


def test_balancing_loss_counts_chosen_and_rejected_passes_separately(models, tmp_path):
    tokenizer, teacher, student = models
    moe = upcycle_to_moe(copy.deepcopy(student))
    trainer = _preference(moe, teacher, tokenizer, tmp_path)
    batch = _one_batch(trainer)
    with torch.no_grad(), trainer.router_logits as router:
        moe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"]
    half = mask.shape[0] // 2
    per_layer = [r.reshape(*mask.shape, -1) for r in router.logits]
    expected = sum(
        moe_balancing_loss([r[rows].reshape(-1, 4) for r in per_layer], 2, 4, attention_mask=mask[rows])
        for rows in (slice(0, half), slice(half, None))
    )
    got = trainer._balancing_per_pass(router.logits, mask)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_preference_reads_teacher_logps_from_the_data_without_a_teacher(models, tmp_path):
    tokenizer, teacher, student = models
    data = pair_data().map(
        lambda row, i: {"ref_chosen_logps": -10.0 - i, "ref_rejected_logps": -5.0}, with_indices=True
    )
    trainer = _preference(copy.deepcopy(student), None, tokenizer, tmp_path, data=data)
    assert trainer.ref_model is None
    batch = _one_batch(trainer)
    assert batch["ref_rejected_logps"].tolist() == [-5.0] * 4
    loss = trainer.compute_loss(trainer.model, dict(batch))
    chosen, rejected = _sequence_logps(trainer.model, batch)
    expected, *_ = teacher_ref_preference_loss(
        chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    with pytest.raises(ValueError, match="teacher_model, or training data"):
        _preference(copy.deepcopy(student), None, tokenizer, tmp_path)


def test_configs_validate_their_choices(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        MoDPreferenceConfig(output_dir=str(tmp_path), loss_type="ipo")
    with pytest.raises(ValueError, match="stage"):
        MoDMimicConfig(output_dir=str(tmp_path), stage="sparse")
    assert MoDMimicConfig(output_dir=str(tmp_path), stage="d2s").sft_weight == 1.0
    assert MoDPreferenceConfig(output_dir=str(tmp_path)).loss_type == ["sigmoid"]


# ---------------------------------------------------------------- teacher-signal cache and the `mod` method


def _write_jsonl(path, rows):
    import json

    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


@pytest.mark.slow
def test_mimic_from_a_full_vocabulary_signal_cache_equals_the_live_teacher(models, tiny_models, tmp_path):
    from align_distill.data_gen import load_signals, run_job

    tokenizer, teacher, student = models
    data = _write_jsonl(tmp_path / "sft.jsonl", synthetic.sft_rows(8, seed=0))
    teachers = [{"name": "dense", "model": str(tiny_models["teacher"])}]
    config = {"input": str(data), "output_dir": str(tmp_path / "signals"), "teachers": teachers, "progress": False}
    signals = load_signals(run_job("signals", {**config, "signals_top_k": len(tokenizer)}))
    live = _mimic(copy.deepcopy(student), teacher, tokenizer, tmp_path)
    args = MoDMimicConfig(**{**COMMON, "output_dir": str(tmp_path)})
    cached = MoDMimicTrainer(
        model=copy.deepcopy(student),
        teacher_signals=signals,
        args=args,
        train_dataset=sft_data(),
        processing_class=tokenizer,
    )
    live_batch, cached_batch = _one_batch(live), _one_batch(cached)
    assert len(cached_batch["row_ids"]) == 4
    assert torch.equal(live_batch["input_ids"], cached_batch["input_ids"])
    live_loss = live.compute_loss(live.model, dict(live_batch)).item()
    cached_loss = cached.compute_loss(cached.model, dict(cached_batch)).item()
    assert cached_loss == pytest.approx(live_loss, rel=5e-3)  # the cache stores fp16 log-probs
    before = snapshot(cached.model)
    cached.train()
    assert changed_names(cached.model, before)


@pytest.mark.slow
def test_mod_method_chains_d2d_d2s_pd(tiny_models, tmp_path):
    """`align-distill train mod` through the pipeline runner: d2d → d2s (upcycled, saved as Qwen2-MoE) → pd."""
    from align_distill.pipeline import Pipeline, Stage

    sft = _write_jsonl(tmp_path / "sft.jsonl", synthetic.sft_rows(16, seed=0))
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", synthetic.preference_rows(16, seed=1))
    common = {
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "max_length": 64,
        "save_strategy": "no",
        "dataloader_pin_memory": False,
        "disable_tqdm": True,
        "teacher_model_name_or_path": str(tiny_models["teacher"]),
        "bf16": False,
    }
    stages = [
        Stage(
            "d2d",
            "train",
            "mod",
            {**common, "stage": "d2d", "model_name_or_path": str(tiny_models["student"]), "dataset_name": str(sft)},
        ),
        Stage(
            "d2s",
            "train",
            "mod",
            {
                **common,
                "stage": "d2s",
                "model_name_or_path": "${d2d}",
                "dataset_name": str(sft),
                "num_experts": 3,
                "num_experts_per_tok": 1,
            },
        ),
        Stage(
            "pd",
            "train",
            "mod",
            {
                **common,
                "stage": "pd",
                "model_name_or_path": "${d2s}",
                "dataset_name": str(pairs),
                "loss_type": "kto_pair",
                "precompute_ref_log_probs": True,
            },
        ),
    ]
    pipeline = Pipeline(tmp_path / "run", stages)
    pipeline.run()
    import json

    results = {s.name: json.loads((tmp_path / "run" / s.name / "stage.json").read_text())["result"] for s in stages}
    assert results["d2d"]["total_parameters"] == results["d2d"]["trainable_parameters"]
    assert results["d2s"]["total_parameters"] > results["d2s"]["activated_parameters"]
    assert results["d2s"]["trainable_parameters"] < results["d2s"]["total_parameters"]
    assert results["pd"]["trainable_parameters"] == results["d2s"]["trainable_parameters"]
    model = load_model(tmp_path / "run" / "pd", dtype="float32")
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.num_experts == 3
    evaluation = synthetic.evaluate(model, load_tokenizer(tmp_path / "run" / "pd"), n=4)
    assert 0.0 <= evaluation.reward <= 1.0


def test_training_config_builds_each_stage_config(tmp_path):
    from align_distill.methods.mod import MoDTrainingConfig

    mimic = MoDTrainingConfig(output_dir=str(tmp_path), max_length=77, seed=3).stage_config("d2s")
    assert isinstance(mimic, MoDMimicConfig) and mimic.stage == "d2s" and mimic.sft_weight == 1.0
    assert (mimic.max_length, mimic.seed, mimic.learning_rate) == (77, 3, 2e-5)
    config = MoDTrainingConfig(output_dir=str(tmp_path), loss_type="kto_pair", beta=0.2, max_length=77, seed=3)
    with pytest.raises(ConfigError, match="`beta`, `loss_type` only act"):  # pd settings have no effect in d2s
        config.stage_config("d2s")
    preference = config.stage_config("pd")
    assert isinstance(preference, MoDPreferenceConfig)
    assert (preference.loss_type, preference.beta, preference.max_length) == (["kto_pair"], 0.2, 77)


def test_response_nll_is_chunked_cross_entropy_with_its_gradient():
    from align_distill.losses.reduction import token_logps
    from align_distill.trainers.mod_mimic import response_nll

    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    got = response_nll(logits, labels, mask, chunk_size=2)
    expected = -token_logps(logits, labels) * mask
    assert torch.allclose(got, expected.to(got.dtype))
    (grad_got,) = torch.autograd.grad(got.sum(), logits)
    (grad_expected,) = torch.autograd.grad(expected.sum(), logits)
    assert torch.allclose(grad_got, grad_expected)


@pytest.mark.slow
def test_pd_stage_trains_a_lora_adapter_and_mimic_stages_refuse_lora(tiny_models, tmp_path, run_method):
    """LoRA in the preference stage: only adapter weights train, the teacher stays the reference, `output_dir` holds
    an adapter that loads on the student; the mimic stages refuse use_peft (their trainable sets are the method)."""
    from peft import PeftModel

    pairs = _write_jsonl(tmp_path / "pairs.jsonl", synthetic.preference_rows(8, seed=1))
    lora = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"]}
    teacher = str(tiny_models["teacher"])
    metrics = run_method(
        "mod",
        stage="pd",
        model_name_or_path=str(tiny_models["student"]),
        teacher_model_name_or_path=teacher,
        dataset_name=str(pairs),
        max_steps=2,
        learning_rate=1e-2,
        **lora,
    )
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"] / 10
    saved = tmp_path / "student"
    assert (saved / "adapter_config.json").exists() and not (saved / "model.safetensors").exists()
    base = load_model(tiny_models["student"], dtype="float32")
    adapted = PeftModel.from_pretrained(base, saved)
    lora_weights = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_weights and any(p.abs().sum() > 0 for p in lora_weights)  # B starts at 0: it trained
    with pytest.raises(SystemExit, match="stage pd only"):
        run_method(
            "mod",
            stage="d2d",
            model_name_or_path=str(tiny_models["student"]),
            teacher_model_name_or_path=teacher,
            dataset_name=str(pairs),
            **lora,
        )


@pytest.mark.slow
def test_mimic_and_preference_from_a_served_teacher(models, tmp_path):
    """A `ServerTeacher` at k = V gives the mimic loss of the in-process teacher, and its summed response
    log-probs for the preference stage are the teacher's own (stand-in server: tests/teachers/teacher_server.py)."""
    from align_distill.data.tokens import encode_prompt_response
    from align_distill.teachers.server import ServerTeacher
    from align_distill.trainers.mod_preference import teacher_logps_from_source
    from tests.teachers.teacher_server import TeacherServer

    tokenizer, teacher, student = models
    server = TeacherServer(teacher, tokenizer)
    try:
        source = ServerTeacher(server.url, tokenizer, len(tokenizer))
        live = _mimic(copy.deepcopy(student), teacher, tokenizer, tmp_path)
        args = MoDMimicConfig(**{**COMMON, "output_dir": str(tmp_path)})
        served = MoDMimicTrainer(
            model=copy.deepcopy(student), teacher_source=source, args=args, train_dataset=sft_data(),
            processing_class=tokenizer,
        )  # fmt: skip
        batch = _one_batch(live)
        live_loss = live.compute_loss(live.model, dict(batch)).item()
        assert served.compute_loss(served.model, dict(batch)).item() == pytest.approx(live_loss, rel=1e-4)

        data = teacher_logps_from_source(pair_data(4), source, tokenizer)
        for row, served_row in zip(pair_data(4), data):
            for response in ("chosen", "rejected"):
                prompt, answer = encode_prompt_response(tokenizer, row["prompt"], row[response])
                ids = torch.tensor([prompt + answer])
                with torch.no_grad():
                    logprobs = teacher(input_ids=ids).logits[0, :-1].log_softmax(-1)
                expected = logprobs.gather(-1, ids[0, 1:, None])[len(prompt) - 1 :].sum().item()
                assert served_row[f"ref_{response}_logps"] == pytest.approx(expected, rel=1e-4)
        source.close()
    finally:
        server.stop()


@pytest.mark.slow
def test_mod_method_trains_d2d_and_pd_against_a_served_teacher(models, tiny_models, tmp_path, run_method):
    """`align-distill train mod` with `teacher_server_url` and no teacher model: d2d asks the server every batch,
    pd scores the pairs once before training."""
    from tests.teachers.teacher_server import TeacherServer

    tokenizer, teacher, _ = models
    server = TeacherServer(teacher, tokenizer)
    try:
        sft = _write_jsonl(tmp_path / "sft.jsonl", synthetic.sft_rows(8, seed=0))
        pairs = _write_jsonl(tmp_path / "pairs.jsonl", synthetic.preference_rows(8, seed=1))
        common = {"model_name_or_path": str(tiny_models["student"]), "teacher_server_url": server.url}
        run_method("mod", stage="d2d", dataset_name=str(sft), signals_top_k=8, max_steps=1, **common)
        asked = server.completions
        assert asked >= 4  # one request per row of the step's batch
        run_method("mod", stage="pd", dataset_name=str(pairs), max_steps=1, output_dir=str(tmp_path / "pd"), **common)
        assert server.completions >= asked + 16  # chosen and rejected of every pair, once
    finally:
        server.stop()
