"""AlignDistil teacher and loss: aligndistil §8.2 worked example, plain-loop references, the seven §8.3 properties."""

import math

import pytest
import torch

from align_distill.losses import aligndistil_loss, aligndistil_teacher

# docs/methods/aligndistil.md §8.2: B=1, T=3, V=4, mask [1, 1, 0]
S = [[0.5, -0.2, 1.0, 0.0], [1.2, 0.3, -0.5, 0.1], [0.0, 0.0, 0.0, 0.0]]
D = [[1.0, -0.5, 0.8, 0.2], [0.9, 0.6, -0.4, 0.0], [0.3, 0.1, 0.2, 0.0]]
R = [[0.4, 0.1, 1.1, -0.1], [1.0, 0.2, -0.3, 0.3], [0.0, 0.5, 0.1, 0.2]]
REF = [[0.7, -0.3, 0.9, 0.1], [1.1, 0.4, -0.4, 0.2], [0.1, 0.2, 0.1, 0.1]]


def _spec():
    as_t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    return as_t(S), as_t(D), as_t(R), as_t(REF), torch.tensor([[True, True, False]])


# ---- plain loops (python floats), written from §8.1 ---------------------------------------------------------------


def _softmax(row):
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    return [e / sum(exps) for e in exps]


def _loop_token(s, d, r, variant, beta0, r_scale, eps, ratio, half):
    pd, pr = _softmax(d), _softmax(r)
    if variant == "adaptive":
        tvd = sum(abs(a - b) for a, b in zip(pd, pr)) * (0.5 if half else 1.0)
        alpha = r_scale * tvd + eps
        z = [a + alpha * (a - b) for a, b in zip(d, r)]
    elif variant == "contrastive":
        alpha, z = ratio, [a + ratio * (a - b) for a, b in zip(d, r)]
    else:  # theorem1: r holds the reference logits
        alpha, z = ratio, [ratio * a + (1 - ratio) * b for a, b in zip(d, r)]
    teacher, ps = _softmax(z), _softmax(s)
    kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip(ps, teacher))
    return beta0 / alpha * kl, alpha, kl


def _loop_loss(s, d, r, mask, variant="adaptive", beta0=0.1, r_scale=10.0, eps=1e-3, ratio=None, half=False):
    per_seq, tokens = [], []
    for b in range(mask.shape[0]):
        vals = []
        for t in range(mask.shape[1]):
            if mask[b, t]:
                out = _loop_token(
                    s[b, t].tolist(), d[b, t].tolist(), r[b, t].tolist(), variant, beta0, r_scale, eps, ratio, half
                )
                vals.append(out[0])
                tokens.append(out)
        if vals:
            per_seq.append(sum(vals) / len(vals))
    return sum(per_seq) / len(per_seq), tokens


def _random(b=2, t=5, v=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s, d, r = (torch.randn(b, t, v, generator=g).to(dtype) for _ in range(3))
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, 0] = True
    return s, d, r, mask


# ---- worked example ----------------------------------------------------------------------------------------------


def test_spec_worked_example_intermediates():
    _, d, r, _, _ = _spec()
    assert d.softmax(-1)[0, :2].flatten().tolist() == pytest.approx(
        [0.401415, 0.089568, 0.328650, 0.180367, 0.413237, 0.306133, 0.112620, 0.168010], abs=1e-6
    )
    teacher, alpha = aligndistil_teacher(d, r)
    assert alpha[0, :2].tolist() == pytest.approx([4.269091, 2.072824], abs=1e-6)
    assert (0.1 / alpha[0, :2]).tolist() == pytest.approx([0.023424, 0.048243], abs=1e-6)
    assert teacher.exp()[0, 0].tolist() == pytest.approx([0.874334, 0.001162, 0.015353, 0.109151], abs=1e-6)
    assert teacher.exp()[0, 1].tolist() == pytest.approx([0.275516, 0.575396, 0.075087, 0.074001], abs=1e-6)
    _, alpha_half = aligndistil_teacher(d, r, tvd_half=True)
    assert ((alpha_half[0, :2] - 1e-3) / 10).tolist() == pytest.approx([0.213405, 0.103591], abs=1e-6)


def test_spec_worked_example_loss_gradient_and_stats():
    s, d, r, _, mask = _spec()
    s.requires_grad_(True)
    loss, stats = aligndistil_loss(s, d, r, mask, beta0=0.1, tvd_scale=10.0, eps=1e-3, return_stats=True)
    assert loss.item() == pytest.approx(0.028602, abs=1e-6)
    loss.backward()
    assert s.grad[0, 0].tolist() == pytest.approx([-0.009476, 0.004476, 0.007754, -0.002755], abs=1e-6)
    assert torch.count_nonzero(s.grad[0, 2]) == 0
    assert stats["alpha"].item() == pytest.approx((4.269091 + 2.072824) / 2, abs=1e-6)
    assert stats["beta"].item() == pytest.approx((0.023424 + 0.048243) / 2, abs=1e-6)
    assert stats["kl"].item() == pytest.approx((1.847569 + 0.288684) / 2, abs=1e-6)
    assert stats["alpha_at_bounds"].item() == 0.0
    assert not any(v.requires_grad for v in stats.values())


def test_spec_worked_example_constant_variants():
    s, d, r, ref, mask = _spec()
    contrastive = aligndistil_loss(s, d, r, mask, beta0=0.1, variant="contrastive", ratio=0.1 / 10)
    assert contrastive.item() == pytest.approx(0.426000, abs=1e-6)
    teacher, alpha = aligndistil_teacher(d, None, variant="theorem1", ratio=0.1 / 0.05, ref_logits=ref)
    assert teacher.exp()[0, 0].tolist() == pytest.approx([0.487323, 0.065952, 0.267449, 0.179276], abs=1e-6)
    assert teacher.exp()[0, 1].tolist() == pytest.approx([0.351542, 0.388514, 0.117018, 0.142926], abs=1e-6)
    assert torch.equal(alpha, torch.full_like(alpha, 2.0))
    theorem1 = aligndistil_loss(s, d, None, mask, beta0=0.1, variant="theorem1", ratio=2.0, ref_logits=ref)
    assert theorem1.item() == pytest.approx(0.005542, abs=1e-6)


# ---- plain-loop references ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,ratio,half",
    [("adaptive", None, False), ("adaptive", None, True), ("contrastive", 0.3, False), ("theorem1", 1.7, False)],
)
def test_loss_and_stats_match_plain_loops(variant, ratio, half):
    s, d, r, mask = _random(seed=1)
    kwargs = dict(beta0=0.2, tvd_scale=3.0, eps=0.01, variant=variant, ratio=ratio, tvd_half=half)
    other = dict(ref_logits=r, rev_logits=None) if variant == "theorem1" else dict(rev_logits=r)
    loss, stats = aligndistil_loss(s, d, mask=mask, chunk_size=3, return_stats=True, **other, **kwargs)
    want, tokens = _loop_loss(s, d, r, mask, variant, 0.2, 3.0, 0.01, ratio, half)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    n = len(tokens)
    assert stats["alpha"].item() == pytest.approx(sum(a for _, a, _ in tokens) / n, abs=1e-6)
    assert stats["beta"].item() == pytest.approx(sum(0.2 / a for _, a, _ in tokens) / n, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(sum(k for _, _, k in tokens) / n, abs=1e-6)
    token_mean = aligndistil_loss(s, d, mask=mask, reduction="token_mean", **other, **kwargs)
    assert token_mean.item() == pytest.approx(sum(w for w, _, _ in tokens) / n, abs=1e-6)


@pytest.mark.parametrize("variant", ["adaptive", "contrastive"])
def test_gradcheck(variant):
    s, d, r, mask = _random(b=2, t=3, v=4, seed=2)
    s.requires_grad_(True)
    ratio = None if variant == "adaptive" else 0.5
    assert torch.autograd.gradcheck(
        lambda x: aligndistil_loss(x, d, r, mask, variant=variant, ratio=ratio, chunk_size=2), (s,)
    )


def test_chunk_size_invariance():
    s, d, r, mask = _random(b=3, t=6, v=9, seed=3)
    results = []
    for chunk_size in (1, 4, 1000, None):
        x = s.clone().requires_grad_(True)
        loss = aligndistil_loss(x, d, r, mask, chunk_size=chunk_size)
        loss.backward()
        results.append((loss.detach(), x.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=1e-12)


def test_bf16_inputs_match_float32():
    s, d, r, mask = _random(b=2, t=6, v=48, seed=4, dtype=torch.float32)
    s16 = s.bfloat16().requires_grad_(True)
    low = aligndistil_loss(s16, d.bfloat16(), r.bfloat16(), mask)
    low.backward()
    s32 = s16.detach().float().requires_grad_(True)
    high = aligndistil_loss(s32, d.bfloat16().float(), r.bfloat16().float(), mask)
    high.backward()
    assert low.dtype == torch.float32 and low.item() == pytest.approx(high.item(), rel=1e-6)
    assert s16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s16.grad.float(), s32.grad, rtol=1e-2, atol=1e-2 * s32.grad.abs().max().item())
    assert low.item() == pytest.approx(aligndistil_loss(s, d, r, mask).item(), rel=3e-2)


# ---- §8.3 properties ---------------------------------------------------------------------------------------------


def test_property_1_equal_models_give_dpo_teacher_and_max_beta():
    s, d, _, mask = _random(seed=5)
    teacher, alpha = aligndistil_teacher(d, d.clone())
    torch.testing.assert_close(alpha, torch.full_like(alpha, 1e-3))
    torch.testing.assert_close(teacher, d.log_softmax(-1))
    _, stats = aligndistil_loss(s, d, d.clone(), mask, beta0=0.1, return_stats=True)
    assert stats["beta"].item() == pytest.approx(100.0)
    assert stats["alpha_at_lower"].item() == 1.0 and stats["alpha_at_upper"].item() == 0.0


def test_property_2_per_position_constants_change_nothing():
    s, d, r, mask = _random(seed=6)
    shift = lambda x, k: x + k * torch.randn(x.shape[:2] + (1,), dtype=x.dtype)  # noqa: E731
    x = s.clone().requires_grad_(True)
    loss = aligndistil_loss(x, d, r, mask)
    loss.backward()
    y = shift(s, 5.0).requires_grad_(True)
    shifted = aligndistil_loss(y, shift(d, 5.0), shift(r, 5.0), mask)
    shifted.backward()
    assert shifted.item() == pytest.approx(loss.item(), abs=1e-10)
    torch.testing.assert_close(y.grad, x.grad)
    torch.testing.assert_close(aligndistil_teacher(shift(d, 3.0), shift(r, 3.0))[1], aligndistil_teacher(d, r)[1])


def test_property_3_student_equal_to_teacher_gives_zero_loss_and_gradient():
    _, d, r, mask = _random(seed=7)
    teacher, _ = aligndistil_teacher(d, r)
    x = (teacher + 2.0).requires_grad_(True)
    loss = aligndistil_loss(x, d, r, mask)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert x.grad.abs().max().item() < 1e-12


def test_property_4_theorem1_endpoints():
    _, d, ref, _ = _random(seed=8)
    torch.testing.assert_close(
        aligndistil_teacher(d, None, variant="theorem1", ratio=1.0, ref_logits=ref)[0], d.log_softmax(-1)
    )
    torch.testing.assert_close(
        aligndistil_teacher(d, None, variant="theorem1", ratio=0.0, ref_logits=ref)[0], ref.log_softmax(-1)
    )


def test_property_5_only_the_student_gets_gradient():
    s, d, r, mask = _random(seed=9)
    x, dd, rr = (t.clone().requires_grad_(True) for t in (s, d, r))
    aligndistil_loss(x, dd, rr, mask).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for teacher_side in (dd, rr):
        assert teacher_side.grad is None or torch.count_nonzero(teacher_side.grad) == 0
    teacher, alpha = aligndistil_teacher(dd, rr)
    assert not teacher.requires_grad and not alpha.requires_grad


def test_property_6_masked_positions_contribute_nothing():
    s, d, r, mask = _random(seed=10)
    x = s.clone().requires_grad_(True)
    loss = aligndistil_loss(x, d, r, mask)
    loss.backward()
    s2, d2, r2 = s.clone(), d.clone(), r.clone()
    s2[~mask], d2[~mask], r2[~mask] = float("nan"), float("inf"), -1e30
    y = s2.requires_grad_(True)
    dirty = aligndistil_loss(y, d2, r2, mask)
    dirty.backward()
    assert dirty.item() == pytest.approx(loss.item(), abs=1e-12)
    torch.testing.assert_close(y.grad, x.grad)
    assert torch.count_nonzero(y.grad[~mask]) == 0


def test_property_7_alpha_increases_with_tvd_and_hits_the_upper_bound():
    d = torch.zeros(1, 6, 3, dtype=torch.float64)
    r = torch.zeros(1, 6, 3, dtype=torch.float64)
    r[0, :, 0] = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0, 8.0])  # the reverse model drifts further and further away
    _, alpha = aligndistil_teacher(d, r)
    tvd = (d.softmax(-1) - r.softmax(-1)).abs().sum(-1)
    assert (tvd[0].diff() > 0).all() and (alpha[0].diff() > 0).all()
    # disjoint supports: TVD = 2, α = 2·tvd_scale + ε, counted at the upper bound
    d_far = torch.tensor([[[60.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    r_far = torch.tensor([[[0.0, 60.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    _, alpha = aligndistil_teacher(d_far, r_far, tvd_scale=10.0)
    assert alpha[0, 0].item() == pytest.approx(20.001)
    _, stats = aligndistil_loss(
        torch.zeros_like(d_far), d_far, r_far, torch.ones(1, 2, dtype=torch.bool), return_stats=True
    )
    assert stats["alpha_at_upper"].item() == 0.5 and stats["alpha_at_lower"].item() == 0.5
    assert stats["alpha_at_bounds"].item() == 1.0


def test_constant_variant_stats_and_errors():
    s, d, r, mask = _random(seed=11)
    _, stats = aligndistil_loss(s, d, r, mask, beta0=0.1, variant="contrastive", ratio=0.01, return_stats=True)
    assert stats["alpha"].item() == pytest.approx(0.01) and stats["beta"].item() == pytest.approx(10.0)
    assert stats["alpha_at_bounds"].item() == 0.0
    with pytest.raises(ValueError, match="needs a fixed ratio"):
        aligndistil_loss(s, d, r, mask, variant="contrastive")
    with pytest.raises(ValueError, match="needs ref_logits"):
        aligndistil_loss(s, d, r, mask, variant="theorem1", ratio=2.0)
    with pytest.raises(ValueError, match="unknown variant"):
        aligndistil_teacher(d, r, variant="gkd")
    with pytest.raises(ValueError, match=r"rev_logits has shape .*padded vocabulary"):
        aligndistil_loss(s, d, torch.cat([r, r], dim=-1), mask)
