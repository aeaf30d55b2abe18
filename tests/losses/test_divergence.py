"""kd_loss and the shared chunking mechanism: plain-loop references, gradients, chunking, masking, dtypes."""

import math

import pytest
import torch

from align_distill.losses import chunked_token_map, kd_loss, masked_mean
from align_distill.losses.divergence import default_chunk_size

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _loop_divergence(s_row, t_row, divergence, beta, temperature) -> float:
    ps = _softmax([x / temperature for x in s_row])
    pt = _softmax([x / temperature for x in t_row])
    if divergence == "forward_kl":
        return _kl(pt, ps)
    if divergence == "reverse_kl":
        return _kl(ps, pt)
    m = [(1 - beta) * a + beta * b for a, b in zip(ps, pt)]
    return beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)


def _loop_kd(student, teacher, mask, divergence, beta=0.5, temperature=1.0, reduction="token_mean") -> float:
    per_seq = []
    for b in range(student.shape[0]):
        vals = [
            _loop_divergence(student[b, t].tolist(), teacher[b, t].tolist(), divergence, beta, temperature)
            for t in range(student.shape[1])
            if mask[b, t]
        ]
        per_seq.append(vals)
    flat = [v for seq in per_seq for v in seq]
    if reduction == "token_mean":
        return sum(flat) / len(flat)
    if reduction == "sum":
        return sum(flat)
    seqs = [sum(seq) / len(seq) for seq in per_seq if seq]
    return sum(seqs) / len(seqs)


def _inputs(b=2, t=5, v=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(b, t, v, generator=g)).to(dtype)
    teacher = (2 * torch.randn(b, t, v, generator=g)).to(dtype)
    mask = torch.rand(b, t, generator=g) > 0.35
    mask[0, 0] = True
    return student, teacher, mask


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum"])
def test_kd_loss_matches_plain_loops(divergence, reduction):
    student, teacher, mask = _inputs(seed=1)
    got = kd_loss(student, teacher, mask, divergence, beta=0.3, temperature=1.7, chunk_size=3, reduction=reduction)
    want = _loop_kd(student, teacher, mask, divergence, beta=0.3, temperature=1.7, reduction=reduction)
    assert got.item() == pytest.approx(want, abs=1e-6, rel=1e-6)


def test_jsd_beta_endpoints_are_the_kls_and_midpoint_is_symmetric():
    student, teacher, mask = _inputs(seed=2)
    fwd = kd_loss(student, teacher, mask, "forward_kl")
    rev = kd_loss(student, teacher, mask, "reverse_kl")
    assert kd_loss(student, teacher, mask, "jsd", beta=0.0).item() == pytest.approx(fwd.item(), abs=1e-12)
    assert kd_loss(student, teacher, mask, "jsd", beta=1.0).item() == pytest.approx(rev.item(), abs=1e-12)
    # β = 0.5 is the symmetric JSD: swapping the roles leaves it unchanged; generic β does not
    jsd = kd_loss(student, teacher, mask, "jsd", beta=0.5).item()
    assert kd_loss(teacher, student, mask, "jsd", beta=0.5).item() == pytest.approx(jsd, abs=1e-12)
    assert kd_loss(teacher, student, mask, "jsd", beta=0.2).item() != pytest.approx(
        kd_loss(student, teacher, mask, "jsd", beta=0.2).item(), abs=1e-6
    )
    assert 0 < jsd <= math.log(2)


@pytest.mark.slow  # importing trl.experimental.gkd pulls in the trainer stack (~10 s on 2 cores)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl_generalized_jsd_loss(beta, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student, teacher, mask = _inputs(seed=3, dtype=torch.float32)
    labels = torch.where(mask, 1, -100)
    want = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=2.0)
    got = kd_loss(student, teacher, mask, "jsd", beta=beta, temperature=2.0)
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_gradcheck(divergence):
    student, teacher, mask = _inputs(b=2, t=3, v=5, seed=4)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: kd_loss(s, teacher, mask, divergence, beta=0.4, temperature=1.3, chunk_size=2), (student,)
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunk_size_does_not_change_value_or_gradient(divergence):
    student, teacher, mask = _inputs(b=3, t=6, v=11, seed=5)
    results = []
    for chunk_size in (1, 2, 5, 1000, None):
        s = student.clone().requires_grad_(True)
        loss = kd_loss(s, teacher, mask, divergence, chunk_size=chunk_size)
        loss.backward()
        results.append((loss.detach(), s.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padding_with_garbage_changes_nothing(divergence):
    student, teacher, mask = _inputs(seed=6)
    s = student.clone().requires_grad_(True)
    kd_loss(s, teacher, mask, divergence).backward()
    garbage_s, garbage_t = student.clone(), teacher.clone()
    garbage_s[~mask] = float("nan")
    garbage_t[~mask] = float("inf")
    padded_s = torch.cat([garbage_s, torch.full_like(garbage_s[:, :2], 1e30)], dim=1).requires_grad_(True)
    padded_t = torch.cat([garbage_t, torch.full_like(garbage_t[:, :2], -1e30)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros_like(mask[:, :2])], dim=1)
    loss = kd_loss(padded_s, padded_t, padded_mask, divergence)
    loss.backward()
    assert loss.item() == pytest.approx(kd_loss(student, teacher, mask, divergence).item(), abs=1e-12)
    torch.testing.assert_close(padded_s.grad[:, : mask.shape[1]][mask], s.grad[mask])
    assert torch.count_nonzero(padded_s.grad[~padded_mask]) == 0


def test_bf16_inputs_compute_in_float32():
    student, teacher, mask = _inputs(b=2, t=8, v=64, seed=7, dtype=torch.float32)
    s16 = student.bfloat16().requires_grad_(True)
    loss16 = kd_loss(s16, teacher.bfloat16(), mask)
    loss16.backward()
    assert loss16.dtype == torch.float32 and s16.grad.dtype == torch.bfloat16
    # the same (bf16-rounded) values in float32 give the same loss: only the inputs were rounded
    s32 = s16.detach().float().requires_grad_(True)
    loss32 = kd_loss(s32, teacher.bfloat16().float(), mask)
    loss32.backward()
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-6)
    torch.testing.assert_close(s16.grad.float(), s32.grad, rtol=1e-2, atol=1e-4)
    assert loss16.item() == pytest.approx(kd_loss(student, teacher, mask).item(), rel=2e-2)


def test_non_contiguous_logits_slice_is_handled_without_copy_semantics_changes():
    student, teacher, mask = _inputs(b=2, t=6, v=9, seed=8)
    full = torch.cat([student, torch.randn(2, 1, 9, dtype=student.dtype)], dim=1).requires_grad_(True)
    sliced = full[:, :-1]  # as a trainer slices logits against shifted labels
    assert not sliced.is_contiguous()
    loss = kd_loss(sliced, teacher, mask, "reverse_kl")
    loss.backward()
    s = student.clone().requires_grad_(True)
    kd_loss(s, teacher, mask, "reverse_kl").backward()
    torch.testing.assert_close(full.grad[:, :-1], s.grad)
    assert torch.count_nonzero(full.grad[:, -1]) == 0


def test_teacher_with_minus_inf_logits_is_finite():
    student, teacher, mask = _inputs(seed=9)
    teacher[..., -2:] = float("-inf")  # e.g. a padded or banned part of the vocabulary
    s = student.clone().requires_grad_(True)
    loss = kd_loss(s, teacher, mask, "forward_kl")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    want = _loop_kd(student, teacher.clamp(min=-1e4), mask, "forward_kl")
    assert loss.item() == pytest.approx(want, abs=1e-9)


def test_student_equal_to_teacher_gives_zero():
    student, _, mask = _inputs(seed=10)
    for divergence in DIVERGENCES:
        assert kd_loss(student, student + 3.0, mask, divergence).item() == pytest.approx(0.0, abs=1e-12)


def test_empty_mask_gives_zero_loss_and_zero_gradient():
    student, teacher, mask = _inputs(seed=11)
    s = student.clone().requires_grad_(True)
    loss = kd_loss(s, teacher, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(s.grad) == 0


def test_shape_errors_say_what_was_expected():
    student, teacher, mask = _inputs(v=7)
    padded = torch.cat([teacher, teacher[..., :3]], dim=-1)
    with pytest.raises(ValueError, match=r"padded vocabulary\? slice teacher_logits\[\.\.\., :7\]"):
        kd_loss(student, padded, mask)
    with pytest.raises(ValueError, match="mask has shape"):
        kd_loss(student, teacher, mask[:, :2])
    with pytest.raises(ValueError, match="unknown divergence"):
        kd_loss(student, teacher, mask, "kl")
    with pytest.raises(ValueError, match="beta must lie in"):
        kd_loss(student, teacher, mask, "jsd", beta=1.5)


def test_chunked_token_map_visits_only_masked_rows_in_bounded_chunks():
    student, teacher, mask = _inputs(b=3, t=7, v=5, seed=12)
    seen = []

    def row_sums(s, t):
        seen.append(s.shape[0])
        assert s.dtype == torch.float64 and t.dtype == torch.float64
        return (s * t).sum(-1), s.amax(-1)

    value, top = chunked_token_map(row_sums, student, teacher, mask=mask, chunk_size=4)
    assert max(seen) <= 4 and sum(seen) == int(mask.sum())
    torch.testing.assert_close(value, torch.where(mask, (student * teacher).sum(-1), 0.0))
    torch.testing.assert_close(top, torch.where(mask, student.amax(-1), 0.0))
    assert not top.requires_grad
    with pytest.raises(ValueError, match="expected one value per position"):
        chunked_token_map(lambda s: s, student, mask=mask)
    with pytest.raises(ValueError, match="tensor 1 has shape"):
        chunked_token_map(row_sums, student, teacher[:, :2], mask=mask)
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        chunked_token_map(row_sums, student, teacher, mask=mask, chunk_size=0)


def test_chunked_token_map_gradient_to_two_inputs_and_bf16_upcast():
    student, teacher, mask = _inputs(b=2, t=4, v=6, seed=13, dtype=torch.float32)
    s, t = student.bfloat16().requires_grad_(True), teacher.bfloat16().requires_grad_(True)

    def cross(a, b):
        assert a.dtype == torch.float32  # bf16 chunks are upcast
        return (a.softmax(-1) * b).sum(-1)

    out = chunked_token_map(cross, s, t, mask=mask, chunk_size=3)
    masked_mean(out, mask).backward()
    s_ref, t_ref = s.detach().float().requires_grad_(True), t.detach().float().requires_grad_(True)
    masked_mean(torch.where(mask, (s_ref.softmax(-1) * t_ref).sum(-1), 0.0), mask).backward()
    torch.testing.assert_close(s.grad.float(), s_ref.grad, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(t.grad.float(), t_ref.grad, rtol=1e-2, atol=1e-4)


def test_default_chunk_size_bounds_the_chunk_elements():
    assert default_chunk_size(49152) == 10
    assert default_chunk_size(152064) == 3
    assert default_chunk_size(5) > 10_000
    assert default_chunk_size(10**9) == 1


def _weighted_sum(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum()


@pytest.mark.parametrize("zero_weight", [False, True])
def test_backward_scales_the_stored_gradient_once_and_a_retained_graph_rescales(zero_weight):
    """The first backward scales the stored gradient in place; a second backward (retain_graph) must still be right,
    also when a zero upstream factor (weight 0 on a masked row) forbids the in-place path."""
    student, teacher, mask = _inputs(b=2, t=6, v=5, seed=21)
    weights = torch.rand(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    if zero_weight:
        weights[mask.nonzero()[0].tolist()] = 0.0

    def reference_grad(w: torch.Tensor) -> torch.Tensor:
        s = student.clone().requires_grad_(True)
        per = torch.where(mask, (teacher.softmax(-1) * (teacher.log_softmax(-1) - s.log_softmax(-1))).sum(-1), 0.0)
        return torch.autograd.grad(_weighted_sum(per, w), s)[0]

    s = student.clone().requires_grad_(True)
    values = chunked_token_map(
        lambda a, b: (b.softmax(-1) * (b.log_softmax(-1) - a.log_softmax(-1))).sum(-1),
        s,
        teacher,
        mask=mask,
        chunk_size=4,
    )
    first = torch.autograd.grad(_weighted_sum(values, weights), s, retain_graph=True)[0].clone()
    torch.testing.assert_close(first, reference_grad(weights))
    other = weights.flip(0) * 3
    second = torch.autograd.grad(_weighted_sum(values, other), s)[0]
    torch.testing.assert_close(second, reference_grad(other))


def test_returned_gradient_is_the_buffer_written_in_the_forward():
    """Memory bound: the backward hands over the gradient buffer filled in the forward (scaled in place), so the
    loss adds one full-size tensor, the gradient it must return, and the leaf keeps that tensor without a copy."""
    student, teacher, mask = _inputs(b=2, t=6, v=5, seed=22)
    s = student.clone().requires_grad_(True)
    values = chunked_token_map(lambda a, b: (a.softmax(-1) * b).sum(-1), s, teacher, mask=mask)
    stored_ptr = values.grad_fn.saved_tensors[2].data_ptr()  # (b_idx, t_idx, gradient of s)
    masked_mean(values, mask).backward()
    assert s.grad.data_ptr() == stored_ptr
    s_ref = student.clone().requires_grad_(True)
    masked_mean(torch.where(mask, (s_ref.softmax(-1) * teacher).sum(-1), 0.0), mask).backward()
    torch.testing.assert_close(s.grad, s_ref.grad)
