"""DCKD top-k KL and ADPA: dckd_adpa §7 hand-computed cases, plain-loop references, properties, chunking, dtypes."""

import math

import pytest
import torch

from align_distill.losses import adpa_advantages, adpa_loss, kd_loss, topk_kd_loss

# docs/methods/dckd_adpa.md §7: one sequence, two positions, V = 5, K = 3
Z_S = [[1.0, 0.5, -0.5, 0.0, -1.0], [0.2, 0.1, 0.0, -0.3, 0.4]]
Z_DPO = [[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 1.5, -0.5, 0.3, 1.0]]
Z_REF = [[1.5, 1.2, 0.3, -0.5, 0.0], [0.5, 0.8, 0.9, 0.0, 0.2]]


def _spec_case():
    zs = torch.tensor([Z_S], dtype=torch.float64)
    log_dpo = torch.tensor([Z_DPO], dtype=torch.float64).log_softmax(-1)
    log_ref = torch.tensor([Z_REF], dtype=torch.float64).log_softmax(-1)
    return zs, log_dpo, log_ref, torch.ones(1, 2, dtype=torch.bool)


def _topk(logprobs: torch.Tensor, k: int):
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values


# ---- plain loops (python floats), written from the method page's "Reference computation"----------------------


def _softmax(row):
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    return [e / sum(exps) for e in exps]


def _loop_dckd_row(z_row, ids, logprobs, official):
    q = _softmax(z_row)
    vocab = len(q)
    p_top = [math.exp(lp) if i < vocab else 0.0 for i, lp in zip(ids, logprobs)]
    q_top = [q[i] if i < vocab else 0.0 for i in ids]
    P = p_top + [1.0 - sum(p_top)]
    if official:
        Q = q_top + [1.0 - sum(q_top)]
        P = [min(max(x, 1e-8), 1 - 1e-8) for x in P]
        Q = [max(min(max(x, 1e-8), 1 - 1e-8), 1e-7) for x in Q]
    else:
        Q = q_top + [sum(q[v] for v in range(vocab) if v not in ids)]
        P[-1] = 0.0 if all(v in ids for v in range(vocab)) else max(P[-1], 0.0)  # rounding residue only
    return sum(p * (math.log(p) - math.log(qq)) for p, qq in zip(P, Q) if p > 0)


def _loop_official_advantages(dpo_ids, dpo_lps, ref_ids, ref_lps):
    fallback = max(min(math.exp(lp) for lp in dpo_lps), 1e-7)
    out = []
    for i, lp in zip(dpo_ids, dpo_lps):
        a = max(math.exp(lp), 1e-7)
        b = max(math.exp(ref_lps[ref_ids.index(i)]), 1e-7) if i in ref_ids else fallback
        out.append(math.log(a / b))
    return out


def _loop_adpa_row(z_row, ids, advantages, official):
    q = _softmax(z_row)
    vocab = len(q)
    if not official:
        return -sum(q[i] * a for i, a in zip(ids, advantages) if i < vocab)
    q_top = [q[i] if i < vocab else 0.0 for i in ids]
    T = [a if i < vocab else 0.0 for i, a in zip(ids, advantages)] + [
        sum(a for i, a in zip(ids, advantages) if i >= vocab)
    ]
    Q = q_top + [1.0 - sum(q_top)]
    clip = [min(max(x, 1e-8), 1 - 1e-8) for x in T]
    return -sum(min(max(x, 1e-8), 1 - 1e-8) * t for x, t in zip(Q, clip))


def _loop_mean(row_fn, mask):
    vals = [row_fn(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    return sum(vals) / len(vals)


def _random_signals(b=2, t=4, v=9, k=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(b, t, v, generator=g)).to(dtype)
    log_dpo = (2 * torch.randn(b, t, v, generator=g)).to(dtype).log_softmax(-1)
    log_ref = (2 * torch.randn(b, t, v, generator=g)).to(dtype).log_softmax(-1)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    return student, log_dpo, log_ref, mask


# ---- DCKD ---------------------------------------------------------------------------------------------------------


def test_spec_test_a_dckd_values():
    zs, log_dpo, _, mask = _spec_case()
    ids, lps = _topk(log_dpo, 3)
    for mode in ("official", "paper"):
        rows = topk_kd_loss(zs, ids, lps, mask, mode=mode, reduction="none")[0]
        assert rows.tolist() == pytest.approx([0.11092601, 0.20420453], abs=1e-8)
        assert topk_kd_loss(zs, ids, lps, mask, mode=mode).item() == pytest.approx(0.15756527, abs=1e-8)
    full_ids = torch.arange(5).expand(1, 2, 5)
    assert topk_kd_loss(zs, full_ids, log_dpo, mask).item() == pytest.approx(0.17183370, abs=1e-8)
    full_rows = kd_loss(zs, log_dpo, mask, "forward_kl", reduction="none")[0]
    assert full_rows.tolist() == pytest.approx([0.13775457, 0.20591282], abs=1e-8)
    assert (topk_kd_loss(zs, ids, lps, mask, reduction="none") <= full_rows + 1e-12).all()


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_topk_kd_matches_plain_loops(mode, k):
    student, log_dpo, _, mask = _random_signals(seed=k)
    ids, lps = _topk(log_dpo, k)
    got = topk_kd_loss(student, ids, lps, mask, mode=mode, chunk_size=3)
    want = _loop_mean(
        lambda b, t: _loop_dckd_row(
            student[b, t].tolist(), ids[b, t].tolist(), lps[b, t].tolist(), mode == "official"
        ),
        mask,
    )
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_topk_paper_with_k_equal_v_is_the_full_kl_and_sequence_mean():
    student, log_dpo, _, mask = _random_signals(seed=20)
    ids = log_dpo.argsort(-1, descending=True)
    lps = log_dpo.gather(-1, ids)
    for reduction in ("token_mean", "sequence_mean", "sum"):
        got = topk_kd_loss(student, ids, lps, mask, reduction=reduction)
        assert got.item() == pytest.approx(kd_loss(student, log_dpo, mask, reduction=reduction).item(), abs=1e-10)


def test_k_equal_v_with_rounded_cache_logprobs_stays_finite():
    # a float32 cache: Σ exp(logprobs) misses 1 by rounding, on either side; the empty rest bin must count 0
    student, log_dpo, _, mask = _random_signals(seed=24)
    ids = log_dpo.argsort(-1, descending=True)
    rounded = log_dpo.gather(-1, ids).float().double()
    assert (1 - rounded.exp().sum(-1)).abs().max() > 1e-12
    s = student.clone().requires_grad_(True)
    loss = topk_kd_loss(s, ids, rounded, mask)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert loss.item() == pytest.approx(kd_loss(student, log_dpo, mask).item(), abs=1e-6)


def test_teacher_ids_beyond_student_vocab_go_to_the_rest_bucket():
    student, log_dpo, _, mask = _random_signals(v=9, seed=21)
    ids, lps = _topk(log_dpo, 4)
    ids[0, 0, 1] = 11  # a padded teacher head's id: no student slot
    ids[1, 2, 3] = 9
    for mode in ("paper", "official"):
        got = topk_kd_loss(student, ids, lps, mask, mode=mode)
        want = _loop_mean(
            lambda b, t, mode=mode: _loop_dckd_row(
                student[b, t].tolist(), ids[b, t].tolist(), lps[b, t].tolist(), mode == "official"
            ),
            mask,
        )
        assert got.item() == pytest.approx(want, abs=1e-6)


def test_dckd_is_zero_when_student_equals_teacher():
    _, log_dpo, _, mask = _random_signals(seed=22)
    ids, lps = _topk(log_dpo, 4)
    assert topk_kd_loss(log_dpo + 1.5, ids, lps, mask).item() == pytest.approx(0.0, abs=1e-12)
    # official clamps leave only rounding-size residue
    assert abs(topk_kd_loss(log_dpo, ids, lps, mask, mode="official").item()) < 1e-6


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_topk_kd_gradcheck(mode):
    student, log_dpo, _, mask = _random_signals(b=1, t=3, v=6, seed=23)
    ids, lps = _topk(log_dpo, 3)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: topk_kd_loss(s, ids, lps, mask, mode=mode, chunk_size=2), (student,))


# ---- ADPA ---------------------------------------------------------------------------------------------------------


def test_spec_test_b_official_advantages_and_loss():
    zs, log_dpo, log_ref, mask = _spec_case()
    dpo_ids, dpo_lps = _topk(log_dpo, 3)
    ref_ids, ref_lps = _topk(log_ref, 3)
    ids, adv = adpa_advantages(dpo_ids, dpo_lps, ref_ids, ref_lps, mode="official")
    assert torch.equal(ids, dpo_ids) and ids[0].tolist() == [[0, 1, 4], [1, 4, 3]]
    assert adv[0, 0].tolist() == pytest.approx([0.30122989, -0.39877011, 0.0], abs=1e-8)
    assert adv[0, 1].tolist() == pytest.approx([0.52844710, 0.70000000, 0.0], abs=1e-8)
    rows = adpa_loss(zs, ids, adv, mask, mode="official", reduction="none")[0]
    assert rows.tolist() == pytest.approx([-0.12912386, -0.29290128], abs=1e-8)
    assert adpa_loss(zs, ids, adv, mask, mode="official").item() == pytest.approx(-0.21101257, abs=1e-8)
    # the same advantages without the clip (diagnostic in docs/methods/dckd_adpa.md) = paper-mode loss on them
    assert adpa_loss(zs, ids, adv, mask, mode="paper").item() == pytest.approx(-0.15917391, abs=1e-8)
    # token 4 at t1 (A = 0.7) gets the largest push up
    s = zs.clone().requires_grad_(True)
    adpa_loss(s, ids, adv, mask, mode="official").backward()
    assert s.grad[0, 1].argmin().item() == 4


def test_spec_test_b_paper_values():
    zs, log_dpo, log_ref, mask = _spec_case()
    dpo_ids, dpo_lps = _topk(log_dpo, 3)
    ids, adv = adpa_advantages(dpo_ids, dpo_lps, dpo_ids, log_ref.gather(-1, dpo_ids))
    assert adv[0, 0].tolist() == pytest.approx([0.30122989, -0.39877011, 0.30122989], abs=1e-8)
    assert adv[0, 1].tolist() == pytest.approx([0.52844710, 0.62844710, 0.12844710], abs=1e-8)
    rows = adpa_loss(zs, ids, adv, mask, reduction="none")[0]
    assert rows.tolist() == pytest.approx([-0.04292155, -0.29081673], abs=1e-8)
    assert adpa_loss(zs, ids, adv, mask).item() == pytest.approx(-0.16686914, abs=1e-8)
    _, adv_beta = adpa_advantages(dpo_ids, dpo_lps, dpo_ids, log_ref.gather(-1, dpo_ids), beta=0.01)
    assert adpa_loss(zs, ids, adv_beta, mask).item() == pytest.approx(-0.0016686914, abs=1e-10)
    full = torch.arange(5).expand(1, 2, 5)
    ids, adv = adpa_advantages(full, log_dpo, full, log_ref)
    assert adpa_loss(zs, ids, adv, mask, reduction="none")[0].tolist() == pytest.approx(
        [0.11497535, 0.13942185], abs=1e-8
    )
    assert adpa_loss(zs, ids, adv, mask).item() == pytest.approx(0.12719860, abs=1e-8)


@pytest.mark.parametrize("k", [2, 4])
def test_official_advantages_and_loss_match_plain_loops(k):
    student, log_dpo, log_ref, mask = _random_signals(seed=30 + k)
    dpo_ids, dpo_lps = _topk(log_dpo, k)
    ref_ids, ref_lps = _topk(log_ref, k + 1)
    ids, adv = adpa_advantages(dpo_ids, dpo_lps, ref_ids, ref_lps, mode="official")
    for b in range(2):
        for t in range(4):
            want = _loop_official_advantages(
                dpo_ids[b, t].tolist(), dpo_lps[b, t].tolist(), ref_ids[b, t].tolist(), ref_lps[b, t].tolist()
            )
            assert adv[b, t].tolist() == pytest.approx(want, abs=1e-9)
    adv = adv * 3.0  # spread the advantages over both clip bounds
    for mode in ("official", "paper"):
        got = adpa_loss(student, ids, adv, mask, mode=mode, chunk_size=3)
        want = _loop_mean(
            lambda b, t, mode=mode: _loop_adpa_row(
                student[b, t].tolist(), ids[b, t].tolist(), adv[b, t].tolist(), mode == "official"
            ),
            mask,
        )
        assert got.item() == pytest.approx(want, abs=1e-6)


def test_paper_advantages_from_the_references_own_topk():
    _, log_dpo, log_ref, _ = _random_signals(seed=40)
    dpo_ids, dpo_lps = _topk(log_dpo, 4)
    # same ids in another order: an exact lookup
    perm = torch.tensor([2, 0, 3, 1])
    _, exact = adpa_advantages(dpo_ids, dpo_lps, dpo_ids[..., perm], log_ref.gather(-1, dpo_ids)[..., perm], beta=0.5)
    torch.testing.assert_close(exact, 0.5 * (dpo_lps - log_ref.gather(-1, dpo_ids)))
    # the reference's own top-3: missing ids fall back to its smallest top-3 log-prob
    ref_ids, ref_lps = _topk(log_ref, 3)
    _, adv = adpa_advantages(dpo_ids, dpo_lps, ref_ids, ref_lps, beta=0.5)
    for b in range(2):
        for t in range(4):
            for j, i in enumerate(dpo_ids[b, t].tolist()):
                r = ref_ids[b, t].tolist()
                ref_lp = ref_lps[b, t, r.index(i)].item() if i in r else min(ref_lps[b, t].tolist())
                assert adv[b, t, j].item() == pytest.approx(0.5 * (dpo_lps[b, t, j].item() - ref_lp), abs=1e-12)
                assert adv[b, t, j].item() <= exact[b, t, j].item() + 1e-12  # a lower bound of the exact value


def test_adpa_advantages_vanish_when_dpo_equals_reference():
    student, log_dpo, _, mask = _random_signals(seed=41)
    ids, lps = _topk(log_dpo, 4)
    _, adv = adpa_advantages(ids, lps, ids, lps)
    assert torch.count_nonzero(adv) == 0
    assert adpa_loss(student, ids, adv, mask).item() == 0.0
    _, adv_official = adpa_advantages(ids, lps, ids, lps, mode="official")
    official = adpa_loss(student, ids, adv_official, mask, mode="official").item()
    assert official == pytest.approx(-1e-8, abs=1e-12)


def test_official_clipping_ignores_negative_and_caps_large_advantages():
    student, log_dpo, _, mask = _random_signals(seed=42)
    ids, _ = _topk(log_dpo, 4)
    adv = torch.tensor([-2.0, -0.1, 1.5, 0.3], dtype=torch.float64).expand(2, 4, 4)
    moved = torch.tensor([-7.0, -0.5, 9.0, 0.3], dtype=torch.float64).expand(2, 4, 4)
    official = adpa_loss(student, ids, adv, mask, mode="official")
    assert adpa_loss(student, ids, moved, mask, mode="official").item() == pytest.approx(official.item(), abs=1e-12)
    assert adpa_loss(student, ids, moved, mask).item() != pytest.approx(adpa_loss(student, ids, adv, mask).item())
    # paper mode pushes a negative-advantage token down directly: its logit gradient is positive
    s = student.clone().requires_grad_(True)
    adpa_loss(s, ids, adv, mask).backward()
    assert (s.grad.gather(-1, ids)[..., 0][mask] > 0).all()


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_adpa_loss_gradcheck(mode):
    student, log_dpo, log_ref, mask = _random_signals(b=1, t=3, v=6, seed=43)
    ids, lps = _topk(log_dpo, 3)
    _, adv = adpa_advantages(ids, lps, ids, log_ref.gather(-1, ids))
    adv = adv.clamp(0.05, 0.95)  # keep official mode away from the clip kinks
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: adpa_loss(s, ids, adv, mask, mode=mode, chunk_size=2), (student,))


# ---- shared: chunking, padding, dtypes, errors --------------------------------------------------------------------


def _both_losses(student, ids, lps, adv, mask, mode, chunk_size=None):
    return (
        topk_kd_loss(student, ids, lps, mask, mode=mode, chunk_size=chunk_size),
        adpa_loss(student, ids, adv, mask, mode=mode, chunk_size=chunk_size),
    )


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_chunk_size_invariance(mode):
    student, log_dpo, log_ref, mask = _random_signals(b=3, t=5, v=10, seed=50)
    ids, lps = _topk(log_dpo, 4)
    _, adv = adpa_advantages(ids, lps, ids, log_ref.gather(-1, ids))
    ref = None
    for chunk_size in (1, 3, 100, None):
        s = student.clone().requires_grad_(True)
        losses = _both_losses(s, ids, lps, adv, mask, mode, chunk_size)
        sum(losses).backward()
        got = (torch.stack([x.detach() for x in losses]), s.grad)
        if ref is None:
            ref = got
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_padding_with_garbage_changes_nothing(mode):
    student, log_dpo, log_ref, mask = _random_signals(seed=51)
    ids, lps = _topk(log_dpo, 4)
    _, adv = adpa_advantages(ids, lps, ids, log_ref.gather(-1, ids))
    clean = _both_losses(student, ids, lps, adv, mask, mode)
    pad = ~mask
    s, i, l, a = student.clone(), ids.clone(), lps.clone(), adv.clone()
    s[pad], i[pad], l[pad], a[pad] = float("nan"), -1, float("inf"), float("nan")  # padding ids may repeat
    s = s.requires_grad_(True)
    dirty = _both_losses(s, i, l, a, mask, mode)
    sum(dirty).backward()
    for x, y in zip(clean, dirty):
        assert x.item() == pytest.approx(y.item(), abs=1e-12)
    assert torch.count_nonzero(s.grad[pad]) == 0 and torch.isfinite(s.grad).all()


def test_bf16_inputs_match_float32():
    student, log_dpo, log_ref, mask = _random_signals(b=2, t=6, v=40, seed=52, dtype=torch.float32)
    ids, lps = _topk(log_dpo, 8)
    _, adv = adpa_advantages(ids, lps, ids, log_ref.gather(-1, ids))
    for mode in ("paper", "official"):
        s16 = student.bfloat16().requires_grad_(True)
        low = _both_losses(s16, ids, lps.bfloat16(), adv.bfloat16(), mask, mode)
        sum(low).backward()
        s32 = s16.detach().float().requires_grad_(True)
        high = _both_losses(s32, ids, lps.bfloat16().float(), adv.bfloat16().float(), mask, mode)
        sum(high).backward()
        for x, y in zip(low, high):
            assert x.dtype == torch.float32 and x.item() == pytest.approx(y.item(), rel=1e-6, abs=1e-7)
        assert s16.grad.dtype == torch.bfloat16  # two bf16 gradients summed: tolerance relative to the largest
        torch.testing.assert_close(s16.grad.float(), s32.grad, rtol=1e-2, atol=1e-2 * s32.grad.abs().max().item())


def test_errors_name_the_problem():
    student, log_dpo, log_ref, mask = _random_signals(seed=53)
    ids, lps = _topk(log_dpo, 4)
    bad = ids.clone()
    bad[0, 0, 2] = bad[0, 0, 0]
    with pytest.raises(ValueError, match=r"repeats a token id at masked position \(batch 0, step 0\)"):
        topk_kd_loss(student, bad, lps, mask)
    bad[0, 0, 2] = -3
    with pytest.raises(ValueError, match=r"negative token id at masked position \(batch 0, step 0\)"):
        adpa_loss(student, bad, lps, mask)
    with pytest.raises(ValueError, match=r"must both be \[B, T, K\]"):
        topk_kd_loss(student, ids, lps[..., :3], mask)
    with pytest.raises(ValueError, match="integer tensor"):
        topk_kd_loss(student, lps, lps, mask)
    with pytest.raises(ValueError, match="carry no β"):
        adpa_advantages(ids, lps, ids, lps, beta=0.01, mode="official")
    with pytest.raises(ValueError, match="unknown mode"):
        adpa_loss(student, ids, lps, mask, mode="offical")
