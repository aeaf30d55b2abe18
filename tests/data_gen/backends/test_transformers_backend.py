"""The transformers backend against raw `model.generate` and a direct forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from align_distill.data.tokens import encode_prompt, encode_prompt_response
from align_distill.data_gen.backends import SamplingParams, TokenScores, make_generator
from align_distill.data_gen.backends.transformers_backend import TransformersGenerator, packed_or_apart
from align_distill.synthetic import prompt_rows


@pytest.fixture(scope="module")
def teacher(tiny_models) -> TransformersGenerator:
    return make_generator("transformers", str(tiny_models["teacher"]), batch_size=4)


PROMPTS = [row["prompt"] for row in prompt_rows(6, 3)]


def test_greedy_equals_raw_generate_per_prompt(teacher):
    params = SamplingParams(max_new_tokens=12)
    batched = teacher.generate(PROMPTS, params)
    for prompt, (completion,) in zip(PROMPTS, batched):
        ids = torch.tensor([encode_prompt(teacher.tokenizer, prompt)])
        raw = teacher.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        raw_ids = raw[0, ids.shape[1] :].tolist()
        eos = teacher.tokenizer.eos_token_id
        expected = raw_ids[: raw_ids.index(eos) + 1] if eos in raw_ids else raw_ids
        assert completion.token_ids == expected
        assert completion.finish_reason == ("stop" if eos in raw_ids else "length")
        assert completion.text == teacher.tokenizer.decode(expected, skip_special_tokens=True)


def test_sampling_depends_on_the_row_seed_only(teacher):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=10)
    seeds = [11, 22, 33, 44, 55, 66]
    together = teacher.generate(PROMPTS, params, seeds=seeds)
    alone = teacher.generate(PROMPTS[4:5], params, seeds=seeds[4:5])
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in together[4]]
    assert together[4][0].token_ids != together[4][1].token_ids  # n samples are independent draws
    other = teacher.generate(PROMPTS[4:5], params, seeds=[99])
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in together[4]]


def test_sampling_follows_the_model_distribution(teacher):
    """Exponential-race sampling draws first tokens with the model's probabilities (chi-square style check)."""
    prompt = PROMPTS[0]
    ids = torch.tensor([encode_prompt(teacher.tokenizer, prompt)])
    probs = torch.softmax(teacher.model(ids).logits[0, -1].float(), -1)
    draws = teacher.generate([prompt] * 400, SamplingParams(temperature=1.0, max_new_tokens=1), seeds=list(range(400)))
    counts = torch.bincount(torch.tensor([d[0].token_ids[0] for d in draws]), minlength=probs.numel()).float()
    top = torch.topk(probs, 3).indices
    for token in top:
        expected = 400 * probs[token]
        assert abs(counts[token] - expected) < 4 * (expected * (1 - probs[token])).sqrt() + 2


def test_stop_string_cuts_text_and_ids(teacher):
    params = SamplingParams(temperature=1.0, max_new_tokens=30, stop=("e",))
    stopped = 0
    for (completion,) in teacher.generate(PROMPTS, params, seeds=list(range(6))):
        assert "e" not in completion.text
        if completion.finish_reason == "stop" and teacher.tokenizer.eos_token_id not in completion.token_ids:
            stopped += 1  # the ids end with the token that completed the stop string
            decoded = teacher.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            assert "e" in decoded and "e" not in teacher.tokenizer.decode(completion.token_ids[:-1])
            assert decoded.startswith(completion.text)
    assert stopped > 0


def direct_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1)


def test_score_matches_a_direct_forward_pass(teacher):
    pairs = [encode_prompt_response(teacher.tokenizer, row["prompt"], row["chosen"]) for row in _pref(5)]
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    k = 7
    batched = teacher.score(prompts, responses, top_k=k)
    single = TransformersGenerator(teacher.model, teacher.tokenizer, batch_size=1).score(prompts, responses, top_k=k)
    # log-probs built a row at a time (bounded memory) give the very same numbers as the whole batch at once
    chunked = TransformersGenerator(teacher.model, teacher.tokenizer, batch_size=4, logprob_budget_bytes=1)
    assert chunked.score(prompts, responses, top_k=k) == batched
    for p, r, got, one in zip(prompts, responses, batched, single):
        exact = direct_logprobs(teacher.model, p, r)
        values, ids = torch.topk(exact, k)
        assert one.topk_ids.tolist() == ids.tolist()  # unpadded: the very same computation
        assert torch.allclose(torch.from_numpy(one.topk_logprobs).float(), values, atol=1e-5)
        # padded batch: same ids up to float noise; values equal the exact log-probs at the returned ids
        got_ids = torch.tensor(got.topk_ids)
        assert torch.allclose(exact.gather(-1, got_ids), torch.from_numpy(got.topk_logprobs).float(), atol=1e-4)
        assert (torch.from_numpy(got.topk_logprobs).float()[:, -1] >= values[:, -1] - 1e-4).all()
        target = exact.gather(-1, torch.tensor(r)[:, None])[:, 0]
        assert torch.allclose(torch.from_numpy(got.token_logprobs).float(), target, atol=1e-4)
        rest = torch.log1p(-exact.gather(-1, got_ids).exp().sum(-1))
        assert torch.allclose(torch.from_numpy(got.rest_logmass).float(), rest, atol=1e-3)


def test_gather_mode_equals_direct_gather(teacher, tiny_models):
    student = make_generator("transformers", str(tiny_models["student"]), batch_size=3)
    pairs = [encode_prompt_response(teacher.tokenizer, row["prompt"], row["rejected"]) for row in _pref(4)]
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    own = teacher.score(prompts, responses, top_k=5)
    gathered = student.score(prompts, responses, top_k=5, gather_ids=[s.topk_ids for s in own])
    for p, r, o, g in zip(prompts, responses, own, gathered):
        exact = direct_logprobs(student.model, p, r)
        ids = torch.tensor(o.topk_ids)
        assert np.array_equal(g.topk_ids, o.topk_ids)
        assert torch.allclose(torch.from_numpy(g.topk_logprobs).float(), exact.gather(-1, ids), atol=1e-4)
        assert torch.allclose(
            torch.from_numpy(g.rest_logmass).float(), torch.log1p(-exact.gather(-1, ids).exp().sum(-1)), atol=1e-3
        )


def test_score_rejects_inputs_it_cannot_score(teacher):
    with pytest.raises(ValueError, match="empty prompt ids"):
        teacher.score([[]], [[1, 2]], top_k=3)
    with pytest.raises(ValueError, match="gather rows"):
        teacher.score([[1]], [[1, 2]], top_k=3, gather_ids=[[[1, 2, 3]]])


def test_factory_names_backends_and_bad_arguments(tiny_models):
    with pytest.raises(ValueError, match="unknown generation backend 'tgi'"):
        make_generator("tgi", "x")
    with pytest.raises(TypeError, match="does not take these arguments"):
        make_generator("transformers", str(tiny_models["student"]), temperature=3)
    with pytest.raises(ConnectionError, match="cannot reach the OpenAI-compatible server at http://127.0.0.1:9/v1"):
        make_generator("openai", "served", base_url="http://127.0.0.1:9/v1")


def _pref(n: int) -> list[dict]:
    from align_distill.synthetic import preference_rows

    return preference_rows(n, 5)


def test_load_weights_replaces_the_generators_model(tiny_models):
    """`Generator.load_weights` (how on-policy trainers sync a rollout engine): the teacher's weights loaded into a
    student-architecture copy make it score like the teacher; an unknown name is refused."""
    from transformers import AutoModelForCausalLM

    teacher = make_generator("transformers", str(tiny_models["teacher"]))
    blank = AutoModelForCausalLM.from_config(teacher.model.config)
    engine = TransformersGenerator(blank, teacher.tokenizer)
    prompt = encode_prompt(teacher.tokenizer, PROMPTS[0])
    response = teacher.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8))[0][0].token_ids
    before = engine.score([prompt], [response], top_k=2)[0].token_logprobs
    loaded = engine.load_weights(teacher.model.named_parameters())
    assert loaded == len(list(teacher.model.parameters()))
    after = engine.score([prompt], [response], top_k=2)[0].token_logprobs
    want = teacher.score([prompt], [response], top_k=2)[0].token_logprobs
    torch.testing.assert_close(torch.tensor(after), torch.tensor(want))
    assert not torch.allclose(torch.tensor(before), torch.tensor(want))
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        engine.load_weights([("nope", torch.zeros(1))])


def _shared_prompt_entries(tokenizer, n: int) -> tuple[list[list[int]], list[list[int]]]:
    """A preference row's chosen and rejected as two entries with one prompt (as the `signals` job gives them), one
    row with a single response, and one entry whose response is empty."""
    prompts, responses = [], []
    for row in _pref(n):
        for column in ("chosen", "rejected"):
            prompt, response = encode_prompt_response(tokenizer, row["prompt"], row[column])
            prompts.append(prompt)
            responses.append(response)
    lone = encode_prompt_response(tokenizer, [{"role": "user", "content": "count: a b"}], "a b")
    return [*prompts, lone[0], prompts[0]], [*responses, lone[1], []]


def _recorded_widths(generator: TransformersGenerator) -> list[tuple[int, int]]:
    """The [rows, width] of each forward pass the generator's model runs from now on."""
    shapes: list[tuple[int, int]] = []
    forward = generator.model.forward

    def recording(*args, **kwargs):
        shapes.append(tuple((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape))
        return forward(*args, **kwargs)

    generator.model.forward = recording
    return shapes


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompts_score_like_one_sequence_per_response(tiny_models, attention):
    """The responses of one prompt packed into one sequence (each masked from the others) score as direct forward
    passes of prompt + response do, with fewer tokens through the model; the log-prob budget splits nothing."""
    shared = TransformersGenerator(str(tiny_models["teacher"]), batch_size=4, attn_implementation=attention)
    apart = TransformersGenerator(
        str(tiny_models["teacher"]), batch_size=4, attn_implementation=attention, share_prompts=False
    )
    assert shared.shares_prompts and not apart.shares_prompts
    prompts, responses = _shared_prompt_entries(shared.tokenizer, 5)
    widths, apart_widths = _recorded_widths(shared), _recorded_widths(apart)
    got = shared.score(prompts, responses, top_k=6)
    plain = apart.score(prompts, responses, top_k=6)
    assert sum(r * w for r, w in widths) < 0.8 * sum(r * w for r, w in apart_widths)
    assert max(r for r, _ in widths) <= 4 // 2  # batch_size counts responses: two per packed sequence
    chunked = TransformersGenerator(shared.model, shared.tokenizer, batch_size=4, logprob_budget_bytes=1)
    assert chunked.score(prompts, responses, top_k=6) == got
    assert got[-1] == TokenScores([], [], [], []) and len(got) == len(prompts)
    for p, r, one, other in zip(prompts[:-1], responses[:-1], got, plain):
        exact = direct_logprobs(shared.model, p, r)
        ids = torch.from_numpy(one.topk_ids)
        assert torch.allclose(exact.gather(-1, ids), torch.from_numpy(one.topk_logprobs).float(), atol=1e-5)
        assert (torch.from_numpy(one.topk_logprobs).float()[:, -1] >= torch.topk(exact, 6).values[:, -1] - 1e-5).all()
        target = exact.gather(-1, torch.tensor(r)[:, None])[:, 0]
        assert torch.allclose(torch.from_numpy(one.token_logprobs).float(), target, atol=1e-5)
        np.testing.assert_allclose(one.rest_logmass, other.rest_logmass, atol=1e-4)
        np.testing.assert_allclose(one.token_logprobs, other.token_logprobs, atol=1e-5)


def test_shared_prompts_gather_at_another_teachers_ids(teacher, tiny_models):
    student = make_generator("transformers", str(tiny_models["student"]), batch_size=3)
    apart = TransformersGenerator(student.model, student.tokenizer, batch_size=3, share_prompts=False)
    prompts, responses = _shared_prompt_entries(teacher.tokenizer, 3)
    own = teacher.score(prompts, responses, top_k=5)
    gathered = student.score(prompts, responses, top_k=5, gather_ids=[s.topk_ids for s in own])
    reference = apart.score(prompts, responses, top_k=5, gather_ids=[s.topk_ids for s in own])
    for g, o, ref in zip(gathered, own, reference):
        assert np.array_equal(g.topk_ids, o.topk_ids)
        np.testing.assert_allclose(g.topk_logprobs, ref.topk_logprobs, atol=1e-5)
        np.testing.assert_allclose(g.rest_logmass, ref.rest_logmass, atol=1e-4)


def test_prompts_are_not_shared_where_the_mask_would_be_wrong(tiny_models):
    """A sliding window (the 4D mask would replace it) or an attention without 4D masks: one sequence per response."""
    generator = TransformersGenerator(str(tiny_models["teacher"]), batch_size=4)
    config = generator.model.config
    config.layer_types = ["sliding_attention", *config.layer_types[1:]]
    assert not generator.shares_prompts
    config.layer_types = ["full_attention"] * len(config.layer_types)
    assert generator.shares_prompts
    config._attn_implementation = "flash_attention_2"
    assert not generator.shares_prompts
    config._attn_implementation = "sdpa"
    prompts, responses = _shared_prompt_entries(generator.tokenizer, 2)
    apart = TransformersGenerator(generator.model, generator.tokenizer, share_prompts=False)
    widths = _recorded_widths(apart)
    apart.score(prompts, responses, 3)
    assert sum(r for r, _ in widths) == len(prompts)


def test_packing_is_chosen_by_its_cost():
    """cost(w) = w + w²/(6H) per sequence: a long prompt shared by two responses packs, many long responses to a short
    prompt on a narrow model do not (attention's quadratic term outgrows the saved prompt tokens)."""
    lengths = [8, 9, 60, 60, 60, 60]
    assert packed_or_apart([0, 1], 14, lengths, hidden=128) == [[0, 1]]  # 31 + 1.25 < 2 × 22.6
    assert packed_or_apart([2, 3, 4, 5], 3, lengths, hidden=128) == [[2], [3], [4], [5]]  # 243 + 76.9 > 4 × 68.2
    assert packed_or_apart([2, 3, 4, 5], 3, lengths, hidden=4096) == [[2, 3, 4, 5]]
    assert packed_or_apart([2, 3, 4, 5], 3, lengths, hidden=None) == [[2, 3, 4, 5]]  # tokens only: any prompt saves
    assert packed_or_apart([3], 3, lengths, hidden=128) == [[3]]


def test_a_group_that_costs_more_packed_is_scored_apart(teacher):
    """Four 60-token responses to a 3-token prompt on the tiny teacher (H = 128): one sequence per response."""
    prompt = [11, 12, 13]
    responses = [[(7 * i + j) % 200 + 5 for j in range(60)] for i in range(4)]
    generator = TransformersGenerator(teacher.model, teacher.tokenizer, batch_size=4)
    widths = _recorded_widths(generator)
    generator.score([prompt] * 4, responses, top_k=3)
    assert widths == [(4, 63)]  # packed: [(1, 243)]
