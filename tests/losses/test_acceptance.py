"""acceptance_rate and topk_acceptance_bounds against plain loops; the top-k bounds hold on random distributions."""

import math

import pytest
import torch

from align_distill.losses import acceptance_rate, kd_loss, topk_acceptance_bounds


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    return [e / sum(exps) for e in exps]


def _inputs(b=3, t=5, v=11, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    target = spread * torch.randn(b, t, v, generator=g, dtype=torch.float64)
    draft = spread * torch.randn(b, t, v, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    return target, draft, mask


def _loop_alpha(target, draft, mask, temperature=1.0) -> float:
    values = []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                p = _softmax([x / temperature for x in target[b, t].tolist()])
                q = _softmax([x / temperature for x in draft[b, t].tolist()])
                values.append(sum(min(a, c) for a, c in zip(p, q)))
    return sum(values) / len(values)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_acceptance_rate_matches_the_plain_loop(temperature, chunk_size):
    target, draft, mask = _inputs()
    value = acceptance_rate(target, draft, mask, temperature=temperature, chunk_size=chunk_size)
    assert value.item() == pytest.approx(_loop_alpha(target, draft, mask, temperature), abs=1e-12)


def test_acceptance_is_one_minus_tvd_and_one_for_identical_rows():
    target, draft, mask = _inputs(seed=1)
    tvd = kd_loss(draft, target, mask, divergence="tvd")
    assert acceptance_rate(target, draft, mask).item() == pytest.approx(1 - tvd.item(), abs=1e-12)
    assert acceptance_rate(target, target, mask).item() == pytest.approx(1.0, abs=1e-12)


def test_per_position_values_and_padding():
    target, draft, mask = _inputs(seed=2)
    per_position = acceptance_rate(target, draft, mask, reduction="none")
    assert per_position.shape == mask.shape and (per_position[~mask] == 0).all()
    garbage = target.clone()
    garbage[~mask] = 1e6
    assert torch.equal(acceptance_rate(garbage, draft, mask, reduction="none"), per_position)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 3, 6])
def test_topk_bounds_hold_on_random_distributions(seed, k):
    # peaked and flat rows alike: the spread varies with the seed
    target, draft, mask = _inputs(seed=seed, spread=0.5 + seed)
    logprobs, ids = target.log_softmax(-1).topk(k, dim=-1)
    exact = acceptance_rate(target, draft, mask, reduction="none")
    low, high = topk_acceptance_bounds(draft, ids, logprobs, mask, reduction="none")
    assert (low <= exact + 1e-12).all() and (exact <= high + 1e-12).all()
    # the plain loop of the bounds at each position
    for b, t in mask.nonzero().tolist():
        p, q = _softmax(target[b, t].tolist()), _softmax(draft[b, t].tolist())
        top = ids[b, t].tolist()
        known = sum(min(p[v], q[v]) for v in top)
        rest = min(1 - sum(p[v] for v in top), 1 - sum(q[v] for v in top))
        assert low[b, t].item() == pytest.approx(known, abs=1e-12)
        assert high[b, t].item() == pytest.approx(known + rest, abs=1e-12)


def test_topk_bounds_meet_at_k_equal_v_and_padded_ids_count_zero():
    target, draft, mask = _inputs(seed=7, v=6)
    logprobs, ids = target.log_softmax(-1).topk(6, dim=-1)
    low, high = topk_acceptance_bounds(draft, ids, logprobs, mask)
    exact = acceptance_rate(target, draft, mask)
    assert low.item() == pytest.approx(exact.item(), abs=1e-12)
    assert high.item() == pytest.approx(exact.item(), abs=1e-12)
    # an id beyond the draft's vocabulary (a padded target vocabulary): the draft has probability 0 there
    padded_ids = ids[..., :2].clone()
    padded_ids[..., 1] = 99
    low, high = topk_acceptance_bounds(draft, padded_ids, logprobs[..., :2], mask, reduction="none")
    first = (target.softmax(-1).gather(-1, ids[..., :1]).minimum(draft.softmax(-1).gather(-1, ids[..., :1])))[..., 0]
    assert torch.allclose(low[mask], first[mask])
