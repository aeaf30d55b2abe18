"""MoE load-balancing loss (docs/methods/llava_mod.md §3.2, hand-computed case T2)."""

import pytest
import torch
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

from align_distill.losses import moe_balancing_loss

T2_PROBS = torch.tensor(
    [[0.4, 0.3, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.5, 0.2, 0.2, 0.1], [0.25, 0.25, 0.3, 0.2]], dtype=torch.float64
)


def _plain_deepspeed(layers, num_experts, mask=None):
    """Per-layer E · Σ_e m_e c_e with first-choice counts, summed over layers, with python loops."""
    total = 0.0
    for logits in layers:
        rows = [
            torch.softmax(row.double(), -1).tolist()
            for i, row in enumerate(logits)
            if mask is None or mask.reshape(-1)[i]
        ]
        n = len(rows)
        m = [sum(r[e] for r in rows) / n for e in range(num_experts)]
        first = [max(range(num_experts), key=lambda e, r=r: r[e]) for r in rows]
        c = [first.count(e) / n for e in range(num_experts)]
        total += num_experts * sum(m[e] * c[e] for e in range(num_experts))
    return total


def test_spec_t2_value():
    loss = moe_balancing_loss(T2_PROBS.log(), top_k=2, num_experts=4)
    assert loss.item() == pytest.approx(1.1875, abs=1e-12)
    assert 0.01 * loss.item() == pytest.approx(0.011875)
    # the same router logits as a [B, T, E] tensor and as a one-layer tuple
    assert moe_balancing_loss(T2_PROBS.log().reshape(2, 2, 4), 2, 4).item() == pytest.approx(1.1875)
    assert moe_balancing_loss((T2_PROBS.log(),), 2, 4).item() == pytest.approx(1.1875)


def test_uniform_routing_gives_one():
    # rows are cyclic shifts: every mean probability is 1/4 and every expert is first choice of one token
    base = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    probs = torch.stack([base.roll(i) for i in range(4)])
    assert moe_balancing_loss(probs.log(), top_k=2, num_experts=4).item() == pytest.approx(1.0, abs=1e-12)
    # transformers' convention counts both choices: uniform routing gives k
    assert moe_balancing_loss(probs.log(), 2, 4, convention="transformers").item() == pytest.approx(2.0)


def test_layers_are_summed_and_padding_can_be_excluded():
    gen = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(2 * 5, 4, generator=gen, dtype=torch.float64) * 2 for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    assert moe_balancing_loss(layers, 2, 4).item() == pytest.approx(_plain_deepspeed(layers, 4), rel=1e-12)
    got = moe_balancing_loss(layers, 2, 4, attention_mask=mask)
    assert got.item() == pytest.approx(_plain_deepspeed(layers, 4, mask), rel=1e-12)
    # changing the logits of padded tokens does not change the masked loss
    noisy = tuple(x.clone().masked_fill_(~mask.reshape(-1, 1).bool(), 7.0) for x in layers)
    assert moe_balancing_loss(noisy, 2, 4, attention_mask=mask).item() == pytest.approx(got.item(), rel=1e-12)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_transformers_convention_matches_transformers(use_mask, top_k):
    gen = torch.Generator().manual_seed(top_k)
    layers = tuple(torch.randn(3 * 6, 5, generator=gen) * 2 for _ in range(2))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4]) if use_mask else None
    expected = load_balancing_loss_func(layers, 5, top_k, mask)
    got = moe_balancing_loss(layers, top_k, 5, attention_mask=mask, convention="transformers")
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_conventions_coincide_for_top1_single_layer_only():
    gen = torch.Generator().manual_seed(5)
    one = torch.randn(12, 4, generator=gen)
    two = (one, torch.randn(12, 4, generator=gen))
    ds, tf = moe_balancing_loss(one, 1, 4), moe_balancing_loss(one, 1, 4, convention="transformers")
    assert ds.item() == pytest.approx(tf.item(), rel=1e-6)
    # two layers: sum of per-layer losses (≈ 2) vs one pooled loss (≈ 1)
    assert moe_balancing_loss(two, 1, 4).item() > 1.5 * moe_balancing_loss(two, 1, 4, convention="transformers").item()


def test_gradient_flows_through_mean_probabilities():
    logits = T2_PROBS.log().clone().requires_grad_()
    moe_balancing_loss(logits, 2, 4).backward()
    # d/dh_{s,j} of E Σ_e c_e g_{s,e} / S = (E/S) g_{s,j} (c_j − Σ_e c_e g_{s,e}), counts held fixed
    c = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64)
    expected = (4 / 4) * T2_PROBS * (c - (T2_PROBS * c).sum(-1, keepdim=True))
    assert torch.allclose(logits.grad, expected, atol=1e-12)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="layer 1 have 3 experts.*expected num_experts=4"):
        moe_balancing_loss((torch.zeros(2, 4), torch.zeros(2, 3)), 2, 4)
    with pytest.raises(ValueError, match="top_k must be in \\[1, num_experts=4\\]; got 5"):
        moe_balancing_loss(torch.zeros(2, 4), 5, 4)
    with pytest.raises(ValueError, match="cover 6 tokens but attention_mask \\(2, 2\\) covers 4"):
        moe_balancing_loss(torch.zeros(6, 4), 2, 4, attention_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="at least one MoE layer"):
        moe_balancing_loss((), 2, 4)
    with pytest.raises(ValueError, match="unknown convention 'switch'"):
        moe_balancing_loss(torch.zeros(2, 4), 2, 4, convention="switch")
