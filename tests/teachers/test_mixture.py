"""`mix_topk` against a plain-loop reference of the documented formula, and `pad_topk`."""

from __future__ import annotations

import math

import pytest
import torch

from align_distill.teachers.mixture import mix_topk, pad_topk
from align_distill.teachers.signals import BatchSignals


def random_teacher(generator: torch.Generator, n: int, t: int, k: int, vocab: int) -> BatchSignals:
    """Top-k of a random full distribution (so each teacher has mass outside its top-k), and a label log-prob."""
    logprobs = torch.randn(n, t, vocab, generator=generator).mul(2).log_softmax(-1)
    values, ids = logprobs.topk(k, dim=-1)
    labels = torch.randint(vocab, (n, t), generator=generator)
    return BatchSignals(ids=ids, logprobs=values, token_logprobs=logprobs.gather(-1, labels[..., None])[..., 0])


def reference_mixture(teachers: list[BatchSignals], weights: list[float], b: int, t: int):
    """The docs' formula, one position at a time with dicts: (id -> q(v), log Σ_i w_i p_i(y))."""
    w = [x / sum(weights) for x in weights]
    mixed: dict[int, float] = {}
    for wi, teacher in zip(w, teachers):
        for i, lp in zip(teacher.ids[b, t].tolist(), teacher.logprobs[b, t].tolist()):
            mixed[i] = mixed.get(i, 0.0) + wi * math.exp(lp)
    z = sum(mixed.values())
    token = math.log(sum(wi * math.exp(float(s.token_logprobs[b, t])) for wi, s in zip(w, teachers)))
    return {i: m / z for i, m in mixed.items()}, token


def test_mixture_matches_the_plain_loop_formula():
    generator = torch.Generator().manual_seed(0)
    teachers = [random_teacher(generator, 2, 5, k, 12) for k in (4, 3, 5)]
    weights = [0.5, 1.0, 2.5]
    mixed = mix_topk(teachers, weights)
    assert mixed.ids.shape == (2, 5, 12)  # Σ K_i slots
    for b in range(2):
        for t in range(5):
            expected, token = reference_mixture(teachers, weights, b, t)
            got = {
                int(i): math.exp(float(lp))
                for i, lp in zip(mixed.ids[b, t], mixed.logprobs[b, t])
                if lp > float("-inf")
            }
            assert got.keys() == expected.keys()
            for i in expected:
                assert got[i] == pytest.approx(expected[i], rel=1e-5)
            assert float(mixed.token_logprobs[b, t]) == pytest.approx(token, rel=1e-5)
            assert len(set(mixed.ids[b, t].tolist())) == 12  # padding ids are distinct too


def test_one_teacher_mixes_to_its_own_renormalised_topk():
    generator = torch.Generator().manual_seed(1)
    teacher = random_teacher(generator, 1, 3, 4, 10)
    mixed = mix_topk([teacher], [3.0])
    order = mixed.ids.sort(-1).indices
    own = teacher.logprobs - teacher.logprobs.logsumexp(-1, keepdim=True)
    assert torch.allclose(mixed.logprobs.gather(-1, order), own.gather(-1, teacher.ids.sort(-1).indices), atol=1e-6)


def test_bad_weights_are_refused():
    generator = torch.Generator().manual_seed(2)
    teacher = random_teacher(generator, 1, 2, 3, 8)
    with pytest.raises(ValueError, match="weights must be >= 0 and not all 0"):
        mix_topk([teacher, teacher], [0.0, 0.0])
    with pytest.raises(ValueError, match="2 teachers' signals for 1 weights"):
        mix_topk([teacher, teacher], [1.0])


def test_pad_topk_adds_massless_distinct_ids():
    generator = torch.Generator().manual_seed(3)
    teacher = random_teacher(generator, 2, 3, 3, 8)
    padded = pad_topk(teacher, 5)
    assert padded.ids.shape == (2, 3, 5) and torch.equal(padded.ids[..., :3], teacher.ids)
    assert torch.isneginf(padded.logprobs[..., 3:]).all()
    assert all(len(set(row.tolist())) == 5 for row in padded.ids.reshape(-1, 5))
