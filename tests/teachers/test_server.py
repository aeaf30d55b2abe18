"""`ServerTeacher`: served signals equal the in-process top-k, one DCKD step gives the same loss with the teacher as a
model, a cache or a server, a server with another vocabulary is refused, and a server that dies mid-run stops the
run with a clear error after which the run resumes from its last checkpoint.

The CPU tests use a stand-in server (`teacher_server.py`: vLLM's endpoints answered by transformers); the `vllm`
tests repeat the two equalities against the real `vllm serve` of the session (tests/vllm_fixtures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from align_distill import synthetic
from align_distill.data import load_dataset_for
from align_distill.models import load_model
from align_distill.teachers.server import ServerTeacher, TeacherServerError
from align_distill.teachers.signals import BatchSignals, live_signals
from align_distill.teachers.sources import SignalsRequest
from align_distill.trainers.dckd import DCKDConfig, DCKDTrainer
from align_distill.trainers.kd import KDConfig, KDTrainer

from .teacher_server import TeacherServer

TOP_K = 8


@pytest.fixture(scope="module")
def teacher_model(tiny_models):
    return load_model(tiny_models["teacher"], dtype="float32", frozen=True)


@pytest.fixture
def fake_server(teacher_model, tiny_tokenizer):
    server = TeacherServer(teacher_model, tiny_tokenizer)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pairs(tiny_models, tmp_path_factory):
    """Preference pairs and the teacher's k = 8 signals on them (the cache)."""
    from align_distill.data_gen import run_job

    root = tmp_path_factory.mktemp("teacher_sources")
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic.preference_rows(4, seed=5)))
    signals = run_job(
        "signals",
        {
            "input": str(path),
            "output_dir": str(root / "signals"),
            "teachers": [{"name": "dpo", "model": str(tiny_models["teacher"])}],
            "signals_top_k": TOP_K,
            "progress": False,
        },
    )
    return {"pairs": path, "signals": signals}


def a_batch(tiny_tokenizer) -> SignalsRequest:
    from align_distill.data.tokens import encode_prompt_response
    from align_distill.trainers.common import right_padded_batch

    rows = synthetic.sft_rows(3, seed=7)
    sequences = [encode_prompt_response(tiny_tokenizer, r["prompt"], r["completion"]) for r in rows]
    batch = right_padded_batch(sequences, tiny_tokenizer.pad_token_id or 0)
    keys = [(str(n), "completion") for n in range(len(rows))]
    return SignalsRequest(keys, batch["input_ids"], batch["completion_mask"], batch["attention_mask"])


def assert_same_signals(served, request, teacher_model, gather=None, atol=1e-4):
    logits = teacher_model(input_ids=request.input_ids, attention_mask=request.attention_mask).logits
    expected = live_signals(logits[:, :-1], request.input_ids[:, 1:], TOP_K, gather_ids=gather)
    mask = request.completion_mask[:, 1:].bool()
    assert torch.equal(served.ids[mask], expected.ids[mask])
    assert torch.allclose(served.logprobs[mask], expected.logprobs[mask], atol=atol)
    assert torch.allclose(served.token_logprobs[mask], expected.token_logprobs[mask], atol=atol)
    assert (served.logprobs[~mask] == 0).all()


def test_served_signals_equal_the_in_process_topk(fake_server, teacher_model, tiny_tokenizer):
    source = ServerTeacher(fake_server.url, tiny_tokenizer, TOP_K)
    request = a_batch(tiny_tokenizer)
    with torch.no_grad():
        served = source.signals(request)
        assert_same_signals(served, request, teacher_model)
        # gather mode (ADPA's reference at the teacher's ids): the full vocabulary, read at the given ids
        gather = served.ids.flip(-1)
        gathered = source.signals(SignalsRequest(**{**vars(request), "gather_ids": gather}))
        assert_same_signals(gathered, request, teacher_model, gather=gather)
    source.close()


class ShiftedTokenizer:
    """Another vocabulary: the tiny tokenizer with every id moved up by one."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text, add_special_tokens=True):
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": [i + 1 for i in ids]}

    def decode(self, ids):
        return self.tokenizer.decode([i - 1 for i in ids])

    def __len__(self):
        return len(self.tokenizer) + 1


def test_a_server_with_another_vocabulary_is_refused(teacher_model, tiny_tokenizer):
    server = TeacherServer(teacher_model, ShiftedTokenizer(tiny_tokenizer))
    try:
        with pytest.raises(TeacherServerError, match=r"tokenizes differently from the student \(probe token 0"):
            ServerTeacher(server.url, tiny_tokenizer, TOP_K, name="dpo")
    finally:
        server.stop()


def dckd(tiny_models, tiny_tokenizer, pairs, out: Path, **teacher) -> DCKDTrainer:
    args = DCKDConfig(
        output_dir=str(out), max_steps=1, per_device_train_batch_size=4, report_to="none", save_strategy="no",
        gradient_checkpointing=False, max_length=64, dataloader_pin_memory=False, seed=0, loss_mode="official",
        signals_top_k=TOP_K, **teacher,
    )  # fmt: skip
    dataset = load_dataset_for(str(pairs), "preference")
    model = load_model(tiny_models["student"], dtype="float32")
    return DCKDTrainer(model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)


def same_step_losses(tiny_models, tiny_tokenizer, pairs, tmp_path, server_url, server_kwargs=None):
    """The DCKD loss of one batch with the teacher as a model, a cache and a server (official mode: top-k form)."""
    kinds = {
        "model": {"teacher_mode": "model", "teacher_model_name_or_path": str(tiny_models["teacher"])},
        "cache": {"teacher_mode": "cache", "signals_path": str(pairs["signals"])},
        "server": {"teacher_mode": "server", "teacher_server_url": server_url,
                   "teacher_server_kwargs": server_kwargs or {}},
    }  # fmt: skip
    trainers = {k: dckd(tiny_models, tiny_tokenizer, pairs["pairs"], tmp_path / k, **c) for k, c in kinds.items()}
    rows = [trainers["model"].train_dataset[i] for i in range(4)]
    losses = {}
    for kind, trainer in trainers.items():
        batch = trainer.data_collator(rows)
        trainer.model.train()
        with torch.no_grad():
            losses[kind] = float(trainer.compute_loss(trainer.model, batch))
    return losses


@pytest.mark.slow
def test_one_step_gives_the_same_loss_for_model_cache_and_server(
    tiny_models, tiny_tokenizer, pairs, fake_server, tmp_path
):
    losses = same_step_losses(tiny_models, tiny_tokenizer, pairs, tmp_path, fake_server.url)
    assert losses["server"] == pytest.approx(losses["model"], abs=1e-5)
    assert losses["cache"] == pytest.approx(losses["model"], rel=2e-3)  # the cache stores float16


class StopServerAfterSave(TrainerCallback):
    def __init__(self, server: TeacherServer, step: int):
        self.server, self.step = server, step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.server.stop()


@pytest.mark.slow
def test_a_dying_server_stops_the_run_clearly_and_the_run_resumes(
    teacher_model, tiny_models, tiny_tokenizer, tmp_path
):
    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in synthetic.sft_rows(8, seed=3)))
    server = TeacherServer(teacher_model, tiny_tokenizer)
    settings = dict(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2, save_steps=2, report_to="none",
        gradient_checkpointing=False, max_length=64, dataloader_pin_memory=False, seed=0, learning_rate=1e-3,
        teacher_mode="server", signals_top_k=TOP_K, logging_steps=1,
        teacher_server_kwargs={"max_retries": 1, "backoff_base": 0.01, "timeout": 5},
    )  # fmt: skip

    def trainer(url: str) -> KDTrainer:
        return KDTrainer(
            model=load_model(tiny_models["student"], dtype="float32"),
            args=KDConfig(**{**settings, "teacher_server_url": url}),
            train_dataset=load_dataset_for(str(rows), "completion"),
            processing_class=tiny_tokenizer,
        )

    first = trainer(server.url)
    first.add_callback(StopServerAfterSave(server, 2))
    with pytest.raises(TeacherServerError, match="failed: could not reach the server .* --resume_from_checkpoint"):
        first.train()
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    restarted = TeacherServer(teacher_model, tiny_tokenizer, port=server.port)
    try:
        second = trainer(restarted.url)
        second.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
        assert second.state.global_step == 4
        steps = [h["step"] for h in second.state.log_history if "kd/loss" in h]
        assert steps == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's state, 3-4 trained after the restart
        assert restarted.completions >= 4  # the resumed steps asked the restarted server
    finally:
        restarted.stop()


@pytest.mark.slow
def test_a_server_scores_the_students_own_samples(fake_server, tiny_models, tiny_tokenizer, tmp_path):
    """KD on-policy (lmbda = 1): the batch's completions are the student's samples, which only a model or a
    server teacher can score; the signals in the loss are the server's on exactly those tokens."""
    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in synthetic.sft_rows(2, seed=3)))
    args = KDConfig(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, report_to="none",
        save_strategy="no", gradient_checkpointing=False, max_length=64, dataloader_pin_memory=False, lmbda=1.0,
        max_completion_length=4, teacher_mode="server", teacher_server_url=fake_server.url, signals_top_k=TOP_K,
    )  # fmt: skip
    trainer = KDTrainer(
        model=load_model(tiny_models["student"], dtype="float32"),
        args=args,
        train_dataset=load_dataset_for(str(rows), "completion"),
        processing_class=tiny_tokenizer,
    )
    seen = []
    original = trainer.signals_collator.add_signals
    trainer.signals_collator.add_signals = lambda batch, *a, **k: seen.append(original(batch, *a, **k)) or seen[-1]
    asked = fake_server.completions
    trainer.train()
    sampled = seen[-1]  # the on-policy batch: the student's samples with the server's signals on them
    request = SignalsRequest([("", "completion")] * 2, sampled["input_ids"], sampled["completion_mask"],
                             sampled["attention_mask"])  # fmt: skip
    teacher = load_model(tiny_models["teacher"], dtype="float32", frozen=True)
    with torch.no_grad():
        served = BatchSignals(sampled["teacher_ids"], sampled["teacher_logprobs"], sampled["teacher_token_logprobs"])
        assert_same_signals(served, request, teacher)
    assert fake_server.completions > asked


# ---- the real vLLM server ---------------------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_served_signals_and_step_loss_equal_the_in_process_ones(
    vllm_server, teacher_model, tiny_models, tiny_tokenizer, pairs, tmp_path
):
    kwargs = {"api_key_env": vllm_server.api_key_env}
    source = ServerTeacher(vllm_server.base_url, tiny_tokenizer, TOP_K, model=vllm_server.model, client_kwargs=kwargs)
    request = a_batch(tiny_tokenizer)
    with torch.no_grad():
        assert_same_signals(source.signals(request), request, teacher_model)
    source.close()
    losses = same_step_losses(tiny_models, tiny_tokenizer, pairs, tmp_path, vllm_server.base_url, kwargs)
    assert losses["server"] == pytest.approx(losses["model"], abs=1e-4)
    assert losses["cache"] == pytest.approx(losses["model"], rel=2e-3)
