"""The `signals` job (teacher-signal cache): exact against a direct forward pass, compact, readable by trainers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from align_distill.data_gen import load_signals, load_store, run_job
from align_distill.data_gen.backends.transformers_backend import TransformersGenerator
from align_distill.data_gen.jobs import SignalsEncoding, measured_bytes_per_token
from align_distill.data_gen.store import store_metadata
from align_distill.models.tiny import train_tiny_tokenizer
from align_distill.synthetic import preference_rows


@pytest.fixture(scope="module")
def models(tiny_models) -> dict[str, TransformersGenerator]:
    return {
        "dpo": TransformersGenerator(str(tiny_models["teacher"]), batch_size=3),
        "ref": TransformersGenerator(str(tiny_models["student"]), batch_size=4),
    }


@pytest.fixture(scope="module")
def preference_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("signals") / "pref.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in preference_rows(5, 4)))
    return str(path)


def teachers(tiny_models) -> list[dict]:
    return [
        {"name": "dpo", "model": str(tiny_models["teacher"])},
        {"name": "ref", "model": str(tiny_models["student"]), "gather_at": "dpo"},
    ]


def direct(model, prompt_ids: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.cat([prompt_ids, response_ids])[None]
    return torch.log_softmax(model(ids).logits[0, len(prompt_ids) - 1 : -1].float(), -1)


def test_signals_equal_a_direct_forward_pass(preference_file, tiny_models, models, tmp_path):
    k = 8
    out = run_job_with(
        models,
        {
            "input": preference_file,
            "output_dir": str(tmp_path / "sig"),
            "signals_top_k": k,
            "shard_size": 2,
            "teachers": teachers(tiny_models),
            "progress": False,
        },
    )
    cache = load_signals(out)
    tokenizer = models["dpo"].tokenizer
    rows = preference_rows(5, 4)
    assert list(cache) == [r["id"] for r in rows] and cache.responses == ["chosen", "rejected"]
    for row in rows:
        cached = cache[row["id"]]
        for response in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(row["prompt"] + row[response], tokenize=True, return_dict=True)
            signals = cached.responses[response]
            # exactly the ids the student sees: template(prompt) + response ids == template(prompt + response)
            assert torch.cat([cached.prompt_ids, signals.response_ids]).tolist() == full["input_ids"]
            dpo = direct(models["dpo"].model, cached.prompt_ids, signals.response_ids)
            ref = direct(models["ref"].model, cached.prompt_ids, signals.response_ids)
            top_values, top_ids = torch.topk(dpo, k)
            got = signals.teachers["dpo"]
            near_tie = (top_values[:, -1] - dpo.topk(k + 1).values[:, -1]) < 1e-4
            assert (got.topk_ids.sort(-1).values == top_ids.sort(-1).values)[~near_tie].all()
            assert torch.allclose(got.topk_logprobs, dpo.gather(-1, got.topk_ids), atol=2e-2, rtol=2e-3)  # fp16
            target = dpo.gather(-1, signals.response_ids[:, None])[:, 0]
            assert torch.allclose(got.token_logprobs, target, atol=2e-2, rtol=2e-3)
            rest = torch.log1p(-dpo.gather(-1, got.topk_ids).exp().sum(-1))
            assert torch.allclose(got.rest_logmass, rest, atol=2e-2, rtol=2e-3)
            gathered = signals.teachers["ref"]  # the reference at the DPO teacher's ids: the direct gather
            assert torch.equal(gathered.topk_ids, got.topk_ids)
            assert torch.allclose(gathered.topk_logprobs, ref.gather(-1, got.topk_ids), atol=2e-2, rtol=2e-3)
        cache.verify(row["id"], cached.prompt_ids.tolist(), "chosen", cached.responses["chosen"].response_ids.tolist())
    with pytest.raises(ValueError, match="chosen ids differ"):
        cache.verify(rows[0]["id"], cache[rows[0]["id"]].prompt_ids.tolist(), "chosen", [1, 2, 3])


def lists_path_signals(model, prompt_ids: list[int], response_ids: list[int], k: int, gather: list | None):
    """One teacher on one unpadded row (the job's batch of one) by the path the signals job took when TokenScores
    held Python lists: log_softmax, top-k (or the gathered ids), the rest by scatter + logsumexp, `.tolist()`,
    then the cache's fp16 from those lists. The stored bytes must not depend on how the values travel."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.inference_mode():
        logits = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(ids.shape[1])[None],
            logits_to_keep=len(response_ids) + 1,
            use_cache=False,
        ).logits[:, :-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token = logprobs.gather(-1, torch.tensor(response_ids)[None, :, None])[..., 0]
    if gather is None:
        values, top = torch.topk(logprobs, k, dim=-1)
    else:
        top = torch.tensor([gather], dtype=torch.long)
        values = logprobs.gather(-1, top)
    rest = logprobs.scatter(-1, top, float("-inf")).logsumexp(-1)

    def fp16(values: list) -> np.ndarray:
        return np.asarray(values, dtype=np.float32).reshape(-1).astype(np.float16)

    return {
        "topk_ids": top[0].tolist(),
        "topk_logprobs": fp16(values[0].tolist()),
        "rest_logmass": fp16(rest[0].tolist()),
        "token_logprobs": fp16(token[0].tolist()),
    }


def test_cached_signals_are_bit_identical_to_the_lists_path(preference_file, tiny_models, models, tmp_path):
    k = 6
    ones = {name: TransformersGenerator(g.model, g.tokenizer, batch_size=1) for name, g in models.items()}
    config = {"input": preference_file, "output_dir": str(tmp_path / "sig"), "signals_top_k": k, "progress": False}
    out = run_job_with(ones, {**config, "teachers": teachers(tiny_models)})
    table = load_store(out).with_format("arrow")[:]
    cache = load_signals(out)
    compared = 0
    for i, row_id in enumerate(table.column("id").to_pylist()):
        prompt = cache[row_id].prompt_ids.tolist()
        for response in ("chosen", "rejected"):
            response_ids = cache[row_id].responses[response].response_ids.tolist()
            dpo = lists_path_signals(models["dpo"].model, prompt, response_ids, k, None)
            ref = lists_path_signals(models["ref"].model, prompt, response_ids, k, dpo["topk_ids"])
            stored_ids = table.column(f"{response}_dpo_topk_ids")[i].values.to_numpy(zero_copy_only=False)
            assert stored_ids.dtype == np.uint16 and stored_ids.tolist() == np.ravel(dpo["topk_ids"]).tolist()
            for teacher, want in (("dpo", dpo), ("ref", ref)):
                for key in ("topk_logprobs", "rest_logmass", "token_logprobs"):
                    got = table.column(f"{response}_{teacher}_{key}")[i].values.to_numpy(zero_copy_only=False)
                    assert got.dtype == np.float16 and got.tobytes() == want[key].tobytes(), (row_id, teacher, key)
                    compared += got.size
    assert compared > 0


def run_job_with(models, config):
    from align_distill.data_gen.jobs import run_signals

    return run_signals(config, generators=models)


def test_signals_on_rollouts_use_the_generated_ids(preference_file, tiny_models, models, tmp_path):
    rollout = run_job(
        "rollout",
        {
            "input": preference_file,
            "output_dir": str(tmp_path / "roll"),
            "model": str(tiny_models["student"]),
            "max_completion_length": 6,
            "progress": False,
        },
    )
    out = run_job_with(
        models,
        {
            "input": str(rollout),
            "output_dir": str(tmp_path / "sig"),
            "signals_top_k": 4,
            "responses": ["completion"],
            "teachers": teachers(tiny_models),
            "progress": False,
        },
    )
    cache = load_signals(out)
    for row in load_store(rollout):
        cached = cache[row["id"]]
        assert cached.prompt_ids.tolist() == row["prompt_ids"]
        assert cached.responses["completion"].response_ids.tolist() == row["completion_ids"]
        assert cached.responses["completion"].teachers["dpo"].topk_ids.shape == (len(row["completion_ids"]), 4)


def test_bytes_per_token_at_k50(preference_file, tiny_models, models, tmp_path):
    config = {"input": preference_file, "signals_top_k": 50, "teachers": teachers(tiny_models), "progress": False}
    out = run_job_with(models, {**config, "output_dir": str(tmp_path / "u16")})
    cache = load_signals(out)
    measured = measured_bytes_per_token(cache.dataset, store_metadata(out))
    assert cache.encoding.id_encoding == "uint16"
    assert cache.encoding.bytes_per_token() == 204 and cache.encoding.bytes_per_token(gathered=True) == 104
    assert 204 <= measured["dpo"] <= 204 * 1.05  # list offsets add a few bytes per row
    assert 104 <= measured["ref"] <= 104 * 1.05
    assert measured["dpo"] + measured["response_ids"] <= 256
    packed = load_signals(
        run_job_with(models, {**config, "output_dir": str(tmp_path / "bits"), "id_encoding": "packed"})
    )
    assert packed.encoding.id_bits == 9  # 320 ids
    for row_id in cache:
        a, b = cache[row_id].responses["rejected"], packed[row_id].responses["rejected"]
        assert torch.equal(a.teachers["dpo"].topk_ids, b.teachers["dpo"].topk_ids)
    assert measured_bytes_per_token(packed.dataset, store_metadata(tmp_path / "bits"))["dpo"] < measured["dpo"]


@pytest.mark.parametrize("vocab", [320, 65536, 128256, 151936])
def test_id_encodings_round_trip_and_fit_256_bytes(vocab):
    encoding = SignalsEncoding.choose(50, vocab)
    assert encoding.id_encoding == ("uint16" if vocab <= 65536 else "packed")
    assert encoding.bytes_per_token() + 4 <= 256  # with the int32 response id
    ids = np.random.default_rng(vocab).integers(0, vocab, size=(7, 50))
    ids[0, 0], ids[0, 1] = 0, vocab - 1
    assert np.array_equal(encoding.decode_ids(encoding.encode_ids(ids), 7), ids)
    with pytest.raises(ValueError, match="does not fit"):
        encoding.encode_ids(np.array([2**encoding.id_bits]))


def test_teachers_must_share_the_student_vocabulary(preference_file, tiny_models, models, tmp_path):
    other = train_tiny_tokenizer(["completely different words"], vocab_size=280)
    with pytest.raises(ValueError, match="teacher 'ref' .* different vocabulary"):
        run_job_with(
            {**models, "ref": TransformersGenerator(models["ref"].model, other)},
            {"input": preference_file, "output_dir": str(tmp_path / "x"), "teachers": teachers(tiny_models)},
        )
