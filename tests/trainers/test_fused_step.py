"""The fused LM-head path of the distillation trainers (`fused_lm_head`, trainers/fused_heads.py): one step's loss
and gradients equal the logits path's on the same batch, and the step never builds a `[B, T, V]` tensor."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode

from align_distill.data import load_dataset_for
from align_distill.data_gen import load_store
from align_distill.models import load_model
from align_distill.synthetic import visual
from align_distill.trainers.adpa import ADPAConfig, ADPATrainer
from align_distill.trainers.dckd import DCKDConfig, DCKDTrainer
from align_distill.trainers.kd import KDTrainer
from align_distill.trainers.mod_mimic import MoDMimicConfig, MoDMimicTrainer
from tests.trainers.test_adpa import adpa_data  # noqa: F401  (module fixture: rollout + signals)
from tests.trainers.test_dckd import dckd_data, tiny_args  # noqa: F401  (module fixture: pairs + signals)
from tests.trainers.test_kd import kd_data  # noqa: F401  (module fixture: SFT rows + signals)
from tests.trainers.test_kd import tiny_args as kd_args
from tests.trainers.test_mod import COMMON as MOD_COMMON
from tests.trainers.test_mod import models, sft_data  # noqa: F401  (module fixture: tokenizer, teacher, student)
from tests.trainers.test_mod_vision import COMMON as VISION_COMMON
from tests.trainers.test_mod_vision import llava  # noqa: F401  (module fixture: the tiny LLaVA pair)

RTOL, ATOL = 1e-5, 1e-6
PADDED_HEAD = 11  # extra head rows of a padded vocabulary (no tokens)


def student(tiny_models, pad: int = 0) -> torch.nn.Module:
    model = load_model(tiny_models["student"], dtype="float32")
    if pad:
        model.resize_token_embeddings(model.config.vocab_size + pad)
    return model


def dckd(tiny_models, tiny_tokenizer, data, out, fused, pad=0, **overrides):
    args = tiny_args(DCKDConfig, out, fused_lm_head=fused, **overrides)
    dataset = load_dataset_for(str(data["pairs"]), "preference")
    return DCKDTrainer(student(tiny_models, pad), args, dataset, tiny_tokenizer)


def adpa(tiny_models, tiny_tokenizer, data, out, fused, pad=0, **overrides):
    args = tiny_args(ADPAConfig, out, fused_lm_head=fused, **overrides)
    return ADPATrainer(student(tiny_models, pad), args, load_store(data["rollout"]), tiny_tokenizer)


def kd(tiny_models, tiny_tokenizer, data, out, fused, pad=0, **overrides):
    if overrides.get("teacher_mode", "model") == "model":
        overrides.setdefault("teacher_model_name_or_path", str(tiny_models["teacher"]))
    dataset = load_dataset_for(str(data["rows"]), "completion")
    args = kd_args(out, fused_lm_head=fused, per_device_train_batch_size=4, **overrides)
    return KDTrainer(student(tiny_models, pad), args, dataset, processing_class=tiny_tokenizer)


def live(tiny_models):
    return {"teacher_mode": "model", "teacher_model_name_or_path": str(tiny_models["teacher"])}


def step(trainer, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of one training step's `compute_loss` + backward, and the gradients of a few parameters (the tied
    embedding/head, the first and last layers' projections)."""
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    names = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight")
    params = dict(model.named_parameters())
    return loss.item(), {name: params[name].grad.clone() for name in names}


def assert_same_step(make, batch_of) -> None:
    fused, plain = make(True), make(False)
    assert fused._fused_ready(fused.model, getattr(fused, "teacher", None))  # the fused path really runs
    batch = batch_of(fused)
    loss, grads = step(fused, batch)
    loss_ref, grads_ref = step(plain, batch)
    assert loss == pytest.approx(loss_ref, rel=RTOL, abs=ATOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=RTOL, atol=ATOL, msg=name)


def first_batch(trainer, rows: int = 4) -> dict:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])


@pytest.mark.parametrize(
    ("case", "pad"),
    [("live_paper", 0), ("live_official", 0), ("cache_official", PADDED_HEAD), ("cache_paper", 0)],
)
def test_dckd_fused_step_equals_the_logits_step(tiny_models, tiny_tokenizer, dckd_data, tmp_path, case, pad):  # noqa: F811
    teacher, mode = case.split("_")
    source = live(tiny_models) if teacher == "live" else {"signals_path": str(dckd_data["signals"])}
    settings = {**source, "loss_mode": mode, "sft_weight": 0.7, "rejected_kl_weight": 0.3}
    assert_same_step(
        lambda fused: dckd(tiny_models, tiny_tokenizer, dckd_data, tmp_path / str(fused), fused, pad, **settings),
        first_batch,
    )


@pytest.mark.parametrize(("mode", "signals"), [("paper", "signals"), ("official", "signals_own")])
def test_adpa_fused_step_equals_the_logits_step(tiny_models, tiny_tokenizer, adpa_data, tmp_path, mode, signals):  # noqa: F811
    settings = {"signals_path": str(adpa_data[signals]), "loss_mode": mode}

    def make(fused):
        return adpa(tiny_models, tiny_tokenizer, adpa_data, tmp_path / str(fused), fused, PADDED_HEAD, **settings)

    assert_same_step(make, first_batch)


@pytest.mark.parametrize(
    "settings",
    [
        {"divergence": "forward_kl", "sft_weight": 0.5},
        {"divergence": "jsd", "beta": 0.3, "temperature": 2.0},
        {"divergence": "taid", "taid_t_start": 0.3},
        {"teacher_mode": "cache", "divergence": "reverse_kl"},
    ],
    ids=["forward_kl+sft", "jsd+temperature", "taid", "cache"],
)
def test_kd_fused_step_equals_the_logits_step(tiny_models, tiny_tokenizer, kd_data, tmp_path, settings):  # noqa: F811
    if settings.get("teacher_mode") == "cache":
        settings = {**settings, "signals_path": str(kd_data["signals_full"])}
    assert_same_step(
        lambda fused: kd(tiny_models, tiny_tokenizer, kd_data, tmp_path / str(fused), fused, PADDED_HEAD, **settings),
        first_batch,
    )


class LargestVocabularyTensor(TorchDispatchMode):
    """The largest number of elements of any tensor over the vocabulary (last dim `vocab`) an operator returns
    inside the block, forward and backward; views (a head's `weight.T`) allocate nothing and are not counted."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[-1] == self.vocab:
                self.largest = max(self.largest, tensor.numel())
        return out


def largest_vocabulary_tensor(trainer, batch, vocab: int) -> int:
    with LargestVocabularyTensor(vocab) as probe:
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
    return probe.largest


def test_the_fused_step_builds_no_batch_by_vocabulary_tensor(tiny_models, tiny_tokenizer, dckd_data, tmp_path):  # noqa: F811
    """DCKD with a live teacher (both heads projected by the loss): no operator of the step's forward or backward
    returns a vocabulary-wide tensor as large as one model's `[N, L-1, V]` logits; the logits path does (the probe
    can fail). The vocabulary here is under one tile wide, so each tile spans it: [ROW_CHUNK, V]."""
    settings = {**live(tiny_models), "sft_weight": 1.0}
    fused = dckd(tiny_models, tiny_tokenizer, dckd_data, tmp_path / "f", True, **settings)
    batch = first_batch(fused, rows=8)
    logits_numel = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1) * len(tiny_tokenizer)
    # the loss's tiles are ROW_CHUNK rows: a batch with more response-view rows than that
    assert batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1) > 256
    fused.model.train()
    assert 0 < largest_vocabulary_tensor(fused, batch, len(tiny_tokenizer)) < logits_numel
    plain = dckd(tiny_models, tiny_tokenizer, dckd_data, tmp_path / "p", False, **settings)
    plain.model.train()
    assert largest_vocabulary_tensor(plain, batch, len(tiny_tokenizer)) >= logits_numel


def softcapped_steps(trainer, batch, caplog) -> tuple[list[torch.Size], list[str]]:
    """Logit soft-capping set on the student's config (read by the fused-path check; qwen2's forward ignores it),
    then two `compute_loss` calls: the output shapes of the student's head and the fused-heads log lines."""
    trainer.model.config.final_logit_softcapping = 30.0
    heads: list[torch.Size] = []
    head = trainer.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: heads.append(out.shape))
    try:
        with caplog.at_level(logging.INFO, logger="align_distill.trainers.fused_heads"):
            trainer.compute_loss(trainer.model, batch)
            trainer.compute_loss(trainer.model, batch)
    finally:
        handle.remove()
    return heads, [record.message for record in caplog.records]


def test_a_head_that_is_not_plain_takes_the_logits_path(tiny_models, tiny_tokenizer, dckd_data, tmp_path, caplog):  # noqa: F811
    """Logit soft-capping (a transform after the head): one info line, then the logits path, the same loss."""
    settings = {"signals_path": str(dckd_data["signals"])}
    fused = dckd(tiny_models, tiny_tokenizer, dckd_data, tmp_path / "f", True, **settings)
    batch = first_batch(fused)
    heads, messages = softcapped_steps(fused, batch, caplog)
    assert messages.count(messages[0]) == 1
    assert "logits path" in messages[0]
    assert all(shape[1] == batch["input_ids"].shape[1] for shape in heads)  # the head made every row's logits


def assert_same_mod_step(make, names: tuple[str, ...]) -> None:
    fused, plain = make(True), make(False)
    assert fused._fused_ready(fused.model, fused.teacher_model)  # the fused path really runs
    batch = fused._prepare_inputs(next(iter(fused.get_train_dataloader())))
    results = []
    for trainer in (fused, plain):
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        params = dict(trainer.model.named_parameters())
        grads = {name: params[name].grad.clone() for name in names}
        results.append((loss.item(), grads, trainer._metrics["train"]["mean_token_accuracy"][-1]))
    (loss, grads, accuracy), (loss_ref, grads_ref, accuracy_ref) = results
    assert loss == pytest.approx(loss_ref, rel=RTOL, abs=ATOL)
    assert accuracy == accuracy_ref
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=RTOL, atol=ATOL, msg=name)


def test_mod_mimic_fused_step_equals_the_logits_step(models, tmp_path):  # noqa: F811
    """LLaVA-MoD mimic on text (live teacher, KD + CE): same loss, gradients and token accuracy on both paths."""
    tokenizer, teacher, base = models

    def make(fused):
        args = MoDMimicConfig(**{**MOD_COMMON, "output_dir": str(tmp_path / str(fused)), "fused_lm_head": fused},
                              stage="d2d", sft_weight=0.5)  # fmt: skip
        model = copy.deepcopy(base)
        return MoDMimicTrainer(model=model, teacher_model=teacher, args=args, train_dataset=sft_data(),
                               processing_class=tokenizer)  # fmt: skip

    assert_same_mod_step(make, ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"))


def test_mod_mimic_fused_step_on_a_vision_student(llava, tmp_path):  # noqa: F811
    """The tiny LLaVA (image tokens in the sequence, the head inside the vision-language wrapper): the fused path
    equals the logits path."""
    _, processor, teacher, base = llava

    def make(fused):
        args = MoDMimicConfig(output_dir=str(tmp_path / str(fused)), stage="d2d", fused_lm_head=fused,
                              **VISION_COMMON)  # fmt: skip
        return MoDMimicTrainer(model=copy.deepcopy(base), teacher_model=teacher, args=args,
                               train_dataset=Dataset.from_list(visual.visual_sft_rows(4, seed=1)),
                               processing_class=processor)  # fmt: skip

    names = [n for n, _ in base.named_parameters()]
    # the (tied) embedding/head and the projector, which only the image tokens' positions reach
    picked = tuple(next(n for n in names if key in n) for key in ("embed_tokens", "multi_modal_projector"))
    assert_same_mod_step(make, picked)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]], ids=["attention", "head"])
def test_kd_lora_student_fused_step_equals_the_logits_step(tiny_models, tiny_tokenizer, kd_data, tmp_path, targets):  # noqa: F811
    """A PEFT LoRA student: adapters in the layers take the fused path (same loss and adapter gradients); an
    adapter on the head is no plain linear layer, so that student takes the logits path — the same loss too."""
    from peft import LoraConfig, get_peft_model

    def make(fused):
        trainer = kd(tiny_models, tiny_tokenizer, kd_data, tmp_path / str(fused), fused, sft_weight=0.5)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        trainer.model = get_peft_model(trainer.model, config)
        return trainer

    fused, plain = make(True), make(False)
    batch = first_batch(fused)
    results = []
    for trainer in (fused, plain):
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad for n, p in trainer.model.named_parameters() if "lora_" in n}
        results.append((loss.item(), grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=RTOL, abs=ATOL)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=RTOL, atol=ATOL, msg=name)
    assert fused._fused_ready(fused.model, fused.teacher) == (targets[-1] != "lm_head")
