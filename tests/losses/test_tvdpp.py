"""TVD++ (Goel et al. 2024) in the divergence family: the value is TVD, the gradient is TVD's policy gradient with
the reward r(v) = 1{p(v) > q(v)} normalised over the student's distribution, checked against plain loops."""

import math

import pytest
import torch

from align_distill.losses import kd_loss, topk_kd_loss
from align_distill.losses.divergences import divergence_from_logprobs


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    return [e / sum(exps) for e in exps]


def _loop_tvdpp_grad(z: list[float], p: list[float]) -> list[float]:
    """∂/∂z_j of −Σ_v q(v)·r̃(v) with r̃ held fixed: −Σ_v r̃(v)·q(v)·(δ_vj − q(j)), written as the loop."""
    q = _softmax(z)
    reward = [1.0 if a > b else 0.0 for a, b in zip(p, q)]
    mean = sum(b * r for b, r in zip(q, reward))
    std = math.sqrt(sum(b * (r - mean) ** 2 for b, r in zip(q, reward)))
    normalised = [(r - mean) / std if std > 0 else 0.0 for r in reward]
    return [
        -sum(normalised[v] * q[v] * ((1.0 if v == j else 0.0) - q[j]) for v in range(len(q))) for j in range(len(q))
    ]


def _inputs(b=2, t=4, v=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(b, t, v, generator=g)).double()
    teacher = (2 * torch.randn(b, t, v, generator=g)).double()
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    return student, teacher, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tvdpp_value_is_tvd_and_gradient_matches_the_plain_loop(seed):
    student, teacher, mask = _inputs(seed=seed)
    student.requires_grad_(True)
    loss = kd_loss(student, teacher, mask, divergence="tvdpp", reduction="sum")
    tvd = kd_loss(student.detach(), teacher, mask, divergence="tvd", reduction="sum")
    assert loss.item() == pytest.approx(tvd.item(), abs=1e-12)
    loss.backward()
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            expected = (
                _loop_tvdpp_grad(student[b, t].tolist(), _softmax(teacher[b, t].tolist()))
                if mask[b, t]
                else [0.0] * student.shape[-1]
            )
            assert student.grad[b, t].tolist() == pytest.approx(expected, abs=1e-10)


def test_tvdpp_gradient_is_the_tvd_gradient_divided_by_the_reward_std():
    """With the exact sum over the vocabulary the baseline cancels: per position, ∇TVD++ = ∇TVD / σ."""
    student, teacher, mask = _inputs(seed=3, b=1, t=1)
    grads = {}
    for name in ("tvd", "tvdpp"):
        z = student.clone().requires_grad_(True)
        kd_loss(z, teacher, mask, divergence=name, reduction="sum").backward()
        grads[name] = z.grad[0, 0]
    q, p = student[0, 0].softmax(-1), teacher[0, 0].softmax(-1)
    mean = q[p > q].sum()
    std = math.sqrt(mean * (1 - mean))
    assert torch.allclose(grads["tvdpp"], grads["tvd"] / std, atol=1e-10)


def test_tvdpp_has_zero_gradient_when_the_distributions_agree():
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    log_q = z.log_softmax(-1)
    value = divergence_from_logprobs(log_q, log_q.detach(), "tvdpp", {})
    value.sum().backward()
    assert value.abs().max().item() == 0.0
    assert z.grad.abs().max().item() == 0.0


def test_tvdpp_runs_on_top_k_signals_with_the_tvd_value():
    student, teacher, mask = _inputs(seed=4)
    logprobs, ids = teacher.log_softmax(-1).topk(3, dim=-1)
    z = student.clone().requires_grad_(True)
    loss = topk_kd_loss(z, ids, logprobs, mask, divergence="tvdpp")
    reference = topk_kd_loss(student, ids, logprobs, mask, divergence="tvd")
    assert loss.item() == pytest.approx(reference.item(), abs=1e-12)
    loss.backward()
    assert z.grad.abs().sum() > 0 and torch.isfinite(z.grad).all()
