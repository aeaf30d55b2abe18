"""Teacher-referenced DPO / KTO-pair (docs/methods/llava_mod.md §5, hand-computed cases T3, T4)."""

import math

import pytest
import torch

from align_distill.losses import teacher_ref_preference_loss


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _reference(pc, pr, tc, tr, beta, loss_type):
    """Plain-python loss (mean reduction) from the method page's formulas."""
    c = [a - b for a, b in zip(pc, tc)]
    r = [a - b for a, b in zip(pr, tr)]
    if loss_type == "sigmoid":
        return sum(-math.log(_sigmoid(beta * (ci - ri))) for ci, ri in zip(c, r)) / len(c)
    z_w = max(0.0, sum(c) / len(c))
    z_l = max(0.0, sum(r) / len(r))
    terms = [1 - _sigmoid(beta * (ci - z_l)) for ci in c] + [1 - _sigmoid(beta * (z_w - ri)) for ri in r]
    return sum(terms) / len(terms)


def test_spec_t3_dpo_value_and_rewards():
    loss, chosen_rewards, rejected_rewards = teacher_ref_preference_loss(_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.5))
    assert loss.item() == pytest.approx(0.620957, abs=1e-6)
    assert loss.item() != pytest.approx(math.log(2), abs=1e-3)  # the teacher is the reference, not the init
    assert chosen_rewards.tolist() == pytest.approx([0.1])
    assert rejected_rewards.tolist() == pytest.approx([-0.05])
    assert not chosen_rewards.requires_grad


def test_spec_t4_kto_pair_batch_one_and_two():
    loss, _, _ = teacher_ref_preference_loss(_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.5), loss_type="kto_pair")
    assert loss.item() == pytest.approx(0.468795, abs=1e-6)
    # batch 2: c = (1.0, -0.4), r = (-0.5, 0.2) with zero teacher log-probs
    zeros = _t(0.0, 0.0)
    loss2, _, _ = teacher_ref_preference_loss(_t(1.0, -0.4), _t(-0.5, 0.2), zeros, zeros, loss_type="kto_pair")
    assert loss2.item() == pytest.approx(0.490633, abs=1e-6)
    per_pair, _, _ = teacher_ref_preference_loss(
        _t(1.0, -0.4), _t(-0.5, 0.2), zeros, zeros, loss_type="kto_pair", reduction="none"
    )
    assert per_pair.tolist() == pytest.approx([(0.475021 + 0.480011) / 2, (0.509999 + 0.497500) / 2], abs=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "kto_pair"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_plain_python_on_random_inputs(loss_type, beta):
    gen = torch.Generator().manual_seed(3)
    pc, pr, tc, tr = (torch.randn(7, generator=gen, dtype=torch.float64) * 5 - 20 for _ in range(4))
    loss, chosen_rewards, rejected_rewards = teacher_ref_preference_loss(
        pc, pr, tc, tr, beta=beta, loss_type=loss_type
    )
    expected = _reference(pc.tolist(), pr.tolist(), tc.tolist(), tr.tolist(), beta, loss_type)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    total, _, _ = teacher_ref_preference_loss(pc, pr, tc, tr, beta=beta, loss_type=loss_type, reduction="sum")
    assert total.item() == pytest.approx(7 * expected, rel=1e-10)
    assert torch.allclose(chosen_rewards, beta * (pc - tc))
    assert torch.allclose(rejected_rewards, beta * (pr - tr))


@pytest.mark.parametrize("loss_type", ["sigmoid", "kto_pair"])
def test_gradcheck(loss_type):
    gen = torch.Generator().manual_seed(4)
    # spread of c and r around 0 so the kto_pair clamps are hit on both sides in the batch mean
    pc = (torch.randn(5, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    pr = (torch.randn(5, generator=gen, dtype=torch.float64) - 0.5).requires_grad_()
    tc, tr = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)

    def fn(a, b):
        return teacher_ref_preference_loss(a, b, tc, tr, beta=0.3, loss_type=loss_type)[0]

    assert torch.autograd.gradcheck(fn, (pc, pr))


def test_kto_pair_kl_proxy_is_not_detached():
    # The rejected KL proxy z_l = max(0, mean r) enters every chosen term: with r > 0 it carries gradient to the
    # rejected log-probs from the chosen terms too; detaching it would change the gradient.
    pc = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([0.5, 1.5], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(2, dtype=torch.float64)
    teacher_ref_preference_loss(pc, pr, zeros, zeros, beta=1.0, loss_type="kto_pair")[0].backward()
    beta = 1.0
    z_w, z_l = 1.5, 1.0
    # d/dr_j of the mean over 4 terms: every chosen term through z_l = mean r (dz_l/dr_j = 1/2), rejected term j
    # directly; both raise the loss as r_j grows
    s = _sigmoid
    chosen_part = sum(s(beta * (c - z_l)) * (1 - s(beta * (c - z_l))) * beta * 0.5 for c in (1.0, 2.0))
    expected = [(chosen_part + s(beta * (z_w - r)) * (1 - s(beta * (z_w - r))) * beta) / 4 for r in (0.5, 1.5)]
    assert pr.grad.tolist() == pytest.approx(expected, rel=1e-9)


def test_bf16_inputs_are_upcast():
    loss, _, _ = teacher_ref_preference_loss(*(t.bfloat16() for t in (_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.5))))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.620957, abs=1e-6)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="four \\[B\\] tensors.*teacher_rejected_logps \\(2,\\)"):
        teacher_ref_preference_loss(_t(1.0), _t(1.0), _t(1.0), _t(1.0, 2.0))
    with pytest.raises(ValueError, match="unknown loss_type 'ipo'"):
        teacher_ref_preference_loss(_t(1.0), _t(1.0), _t(1.0), _t(1.0), loss_type="ipo")
    with pytest.raises(ValueError, match="unknown reduction"):
        teacher_ref_preference_loss(_t(1.0), _t(1.0), _t(1.0), _t(1.0), reduction="token_mean")
