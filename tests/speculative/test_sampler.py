"""The reference speculative sampler: its output distribution is the target's (chi-square over every sequence of a
3-token vocabulary), its measured acceptance is `acceptance_rate`, and it runs on the project's causal LMs."""

import math
from collections import Counter
from itertools import product

import pytest
import torch

from align_distill.models import load_model
from align_distill.speculative import acceptance_rate, causal_lm, speculative_sample
from tests.speculative.tables import table_model

EOS, MAX_NEW, PROMPT = 2, 3, [0]
# 0.999 quantile of the chi-square distribution with 14 degrees of freedom (15 cells − 1)
CHI2_14_999 = 36.12


def _sequences() -> list[tuple[int, ...]]:
    """Every possible output: ends at EOS, or reaches MAX_NEW tokens."""
    out = [(EOS,)]
    out += [(a, EOS) for a in (0, 1)]
    out += [(a, b, c) for a, b in product((0, 1), repeat=2) for c in (0, 1, 2)]
    return out


def _exact(model, sequence: tuple[int, ...]) -> float:
    """Probability of `sequence` after PROMPT under `model`, by the chain rule."""
    ids = PROMPT + list(sequence)
    probs = model(torch.tensor([ids]))[0].double().softmax(-1)
    return math.prod(float(probs[len(PROMPT) - 1 + i, token]) for i, token in enumerate(sequence))


def _chi_square(counts: Counter, expected: dict[tuple[int, ...], float], n: int) -> float:
    return sum((counts[s] - n * p) ** 2 / (n * p) for s, p in expected.items())


@pytest.mark.parametrize("gamma", [1, 2, 4])
def test_output_distribution_is_the_targets(gamma):
    target, draft = table_model(0), table_model(1)
    expected = {s: _exact(target, s) for s in _sequences()}
    assert sum(expected.values()) == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(gamma)
    n = 4000
    counts = Counter(
        tuple(speculative_sample(target, draft, PROMPT, gamma, MAX_NEW, generator, eos_token_id=EOS)[0])
        for _ in range(n)
    )
    assert set(counts) <= set(expected)
    assert _chi_square(counts, expected, n) < CHI2_14_999
    # the same test rejects the draft's own distribution: it has the power to fail
    drafts = {s: _exact(draft, s) for s in _sequences()}
    assert _chi_square(Counter({s: round(n * p) for s, p in drafts.items()}), expected, n) > 10 * CHI2_14_999


def test_measured_acceptance_matches_acceptance_rate_on_the_same_context():
    """γ = 1, one round from a fixed context: the first draft token is accepted with probability Σ min(p, q)."""
    target, draft = table_model(2), table_model(3)
    ids = torch.tensor([PROMPT])
    alpha = float(acceptance_rate(target(ids), draft(ids), torch.ones(1, 1, dtype=torch.bool)))
    generator = torch.Generator().manual_seed(0)
    n, accepted = 6000, 0
    for _ in range(n):
        _, stats = speculative_sample(target, draft, PROMPT, 1, 1, generator)
        assert stats.verified == 1
        accepted += stats.accepted
    assert abs(accepted / n - alpha) < 4 * math.sqrt(alpha * (1 - alpha) / n)
    assert 0.2 < alpha < 0.95  # a context where acceptance is neither certain nor impossible


def test_a_draft_equal_to_the_target_is_always_accepted():
    model = table_model(4)
    generator = torch.Generator().manual_seed(0)
    _, stats = speculative_sample(model, model, PROMPT, 3, 6, generator, eos_token_id=None)
    assert stats.accepted == stats.verified == stats.drafted
    assert stats.block_efficiency == 4.0  # γ + 1 tokens per target call


def test_same_seed_same_tokens():
    target, draft = table_model(0), table_model(1)
    runs = [
        speculative_sample(target, draft, PROMPT, 2, 3, torch.Generator().manual_seed(7), eos_token_id=EOS)
        for _ in range(2)
    ]
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]


def test_runs_on_tiny_causal_lms(tiny_models, tiny_tokenizer):
    target = load_model(tiny_models["teacher"], dtype="float32")
    draft = load_model(tiny_models["student"], dtype="float32")
    prompt = tiny_tokenizer("what is 2 + 3", add_special_tokens=False)["input_ids"]
    tokens, stats = speculative_sample(
        causal_lm(target), causal_lm(draft), prompt, 4, 10, torch.Generator().manual_seed(0)
    )
    assert 1 <= len(tokens) <= 10 and all(0 <= t < target.config.vocab_size for t in tokens)
    assert stats.target_calls >= 1 and stats.accepted <= stats.verified <= stats.drafted
    # the same model as its own draft accepts everything
    _, same = speculative_sample(causal_lm(target), causal_lm(target), prompt, 4, 10, torch.Generator().manual_seed(0))
    assert same.accepted == same.verified


@pytest.mark.parametrize(("gamma", "temperature"), [(0, 1.0), (2, 0.0)])
def test_bad_arguments_are_refused(gamma, temperature):
    model = table_model(0)
    with pytest.raises(ValueError, match="gamma|temperature"):
        speculative_sample(model, model, PROMPT, gamma, 3, torch.Generator(), temperature=temperature)
