"""PRO ranking loss + SFT (docs/methods/cyclealign.md §7, hand-computed cases U3–U6)."""

import math
import random

import pytest
import torch

from align_distill.losses import pro_loss


def _t(*rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def _reference(seq_logps, lengths, ranking, n, rewards=None, sft_beta=0.05, sft_weight=None):
    """Per-prompt PRO loss with python loops, straight from the method page's sums."""
    ordered = [ranking[k] for k in range(n)]
    s = [seq_logps[c] / lengths[c] for c in ordered]
    total = 0.0
    for k in range(n - 1):
        if rewards is None:
            total += -s[k] + math.log(sum(math.exp(s[i]) for i in range(k, n)))
        else:
            r = [rewards[c] for c in ordered]
            gaps = [r[k] - r[i] for i in range(k + 1, n)]
            top = max(gaps)
            inner = math.exp(s[k] * top) + sum(math.exp(s[i] * g) for i, g in zip(range(k + 1, n), gaps))
            total += -s[k] * top + math.log(inner)
    weight = sft_weight if sft_weight is not None else sft_beta * (n - 1) ** 2
    return total + weight * (-seq_logps[ordered[0]])


def test_spec_u3_rank_only_and_misordering():
    identity = torch.tensor([[0, 1, 2]])
    ones = torch.ones(1, 3)
    _, rank, _ = pro_loss(_t([-1.0, -1.5, -2.0]), ones, identity)
    assert rank.item() == pytest.approx(1.154347, abs=1e-6)
    _, rank_bad, _ = pro_loss(_t([-1.8, -1.5, -2.0]), ones, identity)
    assert rank_bad.item() == pytest.approx(1.627364, abs=1e-6)


def test_spec_u4_reward_temperatures_and_degeneracy():
    identity = torch.tensor([[0, 1, 2]])
    ones = torch.ones(1, 3)
    scores = _t([-1.0, -1.5, -2.0]).requires_grad_()
    _, rank, _ = pro_loss(scores, ones, identity, rewards=_t([0.9, 0.5, 0.1]))
    assert rank.item() == pytest.approx(1.580491, abs=1e-6)
    _, flat, _ = pro_loss(scores, ones, identity, rewards=_t([0.3, 0.3, 0.3]))
    assert flat.item() == pytest.approx(math.log(3) + math.log(2), abs=1e-12)
    flat.backward()
    assert torch.equal(scores.grad, torch.zeros_like(scores))  # all-equal rewards: no ranking signal


def test_spec_u5_total_with_sft_term():
    # scores (-1, -1.5, -2) as length-normalised sums over 3 tokens; L_SFT = 3.0 on the top response
    loss, rank, sft = pro_loss(_t([-3.0, -4.5, -6.0]), torch.full((1, 3), 3), torch.tensor([[0, 1, 2]]))
    assert loss.item() == pytest.approx(1.754347, abs=1e-6)
    assert rank.item() == pytest.approx(1.154347, abs=1e-6)
    assert sft.item() == pytest.approx(3.0)


def test_spec_u6_training_on_agreement_ranking():
    # candidates A B C D; α = A C D: B is not used, SFT weight 0.05 · 4 on A
    logps = _t([-2.0, -1.0, -3.0, -4.0]).requires_grad_()
    lengths = torch.tensor([[2, 2, 3, 4]])
    loss, _, _ = pro_loss(logps, lengths, torch.tensor([[0, 2, 3, -1]]), valid=torch.tensor([[1, 1, 1, 0]]))
    expected = _reference([-2.0, -1.0, -3.0, -4.0], [2, 2, 3, 4], [0, 2, 3], 3)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # all three scores are -1: steps give log 3 and log 2; SFT 0.2 · 2.0
    assert expected == pytest.approx(math.log(3) + math.log(2) + 0.2 * 2.0)
    loss.backward()
    assert logps.grad[0, 1].item() == 0.0
    # α = A alone: the prompt is skipped, nothing to learn
    logps.grad = None
    skipped, _, _ = pro_loss(logps, lengths, torch.tensor([[0, -1, -1, -1]]), valid=torch.tensor([[1, 0, 0, 0]]))
    skipped.backward()
    assert skipped.item() == 0.0 and torch.equal(logps.grad, torch.zeros_like(logps))


@pytest.mark.parametrize("use_rewards", [False, True])
def test_matches_plain_loop_on_random_lists(use_rewards):
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    B, N = 6, 5
    seq_logps = -torch.rand(B, N, generator=gen, dtype=torch.float64) * 20
    lengths = torch.randint(1, 9, (B, N), generator=gen)
    rewards = torch.randn(B, N, generator=gen, dtype=torch.float64) if use_rewards else None
    sizes = [5, 4, 2, 3, 1, 5]
    ranking = torch.full((B, N), -1)
    valid = torch.zeros(B, N, dtype=torch.bool)
    for b, n in enumerate(sizes):
        chosen = rng.sample(range(N), n)
        ranking[b, :n] = torch.tensor(chosen)
        valid[b, :n] = True
    for sft_weight in (None, 0.7):
        loss, _, _ = pro_loss(seq_logps, lengths, ranking, valid, rewards=rewards, sft_weight=sft_weight)
        per_prompt, _, _ = pro_loss(
            seq_logps, lengths, ranking, valid, rewards=rewards, sft_weight=sft_weight, reduction="none"
        )
        expected = [
            _reference(
                seq_logps[b].tolist(),
                lengths[b].tolist(),
                ranking[b].tolist(),
                n,
                None if rewards is None else rewards[b].tolist(),
                sft_weight=sft_weight,
            )
            if n >= 2
            else 0.0
            for b, n in enumerate(sizes)
        ]
        assert per_prompt.tolist() == pytest.approx(expected, rel=1e-10)
        assert loss.item() == pytest.approx(sum(expected) / 5, rel=1e-10)  # one prompt (n = 1) is skipped
        total, _, _ = pro_loss(
            seq_logps, lengths, ranking, valid, rewards=rewards, sft_weight=sft_weight, reduction="sum"
        )
        assert total.item() == pytest.approx(sum(expected), rel=1e-10)


def test_length_normalise_switch():
    # U2's responses: summed (-3, -4) over (3, 6) tokens. Normalised, ranking y_1 first is the worse list.
    logps, lengths = _t([-3.0, -4.0]), torch.tensor([[3, 6]])
    _, normalised, _ = pro_loss(logps, lengths, torch.tensor([[0, 1]]))
    _, summed, _ = pro_loss(logps, lengths, torch.tensor([[0, 1]]), length_normalise=False)
    assert normalised.item() == pytest.approx(math.log(1 + math.exp(-4 / 6 + 1)))
    assert summed.item() == pytest.approx(math.log(1 + math.exp(-1.0)))


@pytest.mark.parametrize("use_rewards", [False, True])
def test_gradcheck(use_rewards):
    gen = torch.Generator().manual_seed(2)
    logps = (-torch.rand(2, 4, generator=gen, dtype=torch.float64) * 5).requires_grad_()
    lengths = torch.tensor([[1, 2, 3, 4], [2, 2, 2, 2]])
    ranking = torch.tensor([[3, 1, 0, 2], [1, 0, 2, -1]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    rewards = torch.tensor([[0.1, 0.5, 0.0, 0.9], [0.2, 0.8, 0.1, 0.0]], dtype=torch.float64) if use_rewards else None

    def fn(x):
        return pro_loss(x, lengths, ranking, valid, rewards=rewards)[0]

    assert torch.autograd.gradcheck(fn, (logps,))


def test_empty_batch_of_rankings_gives_zero_mean():
    logps = _t([-1.0, -2.0]).requires_grad_()
    loss, _, _ = pro_loss(logps, torch.ones(1, 2), torch.tensor([[1, 0]]), valid=torch.tensor([[True, False]]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logps.grad, torch.zeros_like(logps))


def test_errors_name_the_problem():
    logps, lengths = _t([-1.0, -2.0, -3.0]), torch.ones(1, 3)
    with pytest.raises(ValueError, match="lists a candidate more than once"):
        pro_loss(logps, lengths, torch.tensor([[0, 0, 1]]))
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        pro_loss(logps, lengths, torch.tensor([[0, 3, 1]]))
    with pytest.raises(ValueError, match="prefix of each ranking.*row 0"):
        pro_loss(logps, lengths, torch.tensor([[0, 1, 2]]), valid=torch.tensor([[True, False, True]]))
    with pytest.raises(ValueError, match="\\[B, N\\] tensors of one shape.*lengths \\(1, 2\\)"):
        pro_loss(logps, torch.ones(1, 2), torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="int64"):
        pro_loss(logps, lengths, torch.tensor([[0.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="length 0; expected ≥ 1 token"):
        pro_loss(logps, torch.tensor([[1, 0, 1]]), torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="rewards \\(3,\\) must match"):
        pro_loss(logps, lengths, torch.tensor([[0, 1, 2]]), rewards=torch.ones(3))
    with pytest.raises(ValueError, match="unknown reduction"):
        pro_loss(logps, lengths, torch.tensor([[0, 1, 2]]), reduction="token_mean")
