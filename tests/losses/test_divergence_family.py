"""The divergence family of kd_loss and topk_kd_loss (docs/methods/kd.md): plain-loop references, gradients,
chunking, padding, special cases, the top-k form, errors, and the hand-checked 3-token example of the docs."""

import math

import pytest
import torch

from align_distill.losses import kd_loss, topk_kd_loss

# (divergence, params) pairs exercised everywhere; the parameters sit away from their endpoints
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_forward_kl", {"alpha": 0.6}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.6}),
    ("tvd", {}),
    ("akl", {"mu": 0.5}),
    ("akl", {"mu": 0.2}),
    ("taid", {"taid_t": 0.4}),
]
IDS = [f"{name}-{'-'.join(f'{k}{v}' for k, v in params.items())}" for name, params in CASES]
# divergences whose gradient is the derivative of their value (AKL's gap weights and TAID's target are detached)
PLAIN = [(name, params) for name, params in CASES if name not in ("akl", "taid")]


# ---- plain loops over python floats (independent of the implementation) ------------------------------------------


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(a: list[float], b: list[float]) -> float:
    """KL(a ‖ b); terms with a = 0 count 0."""
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _loop_value(p: list[float], q: list[float], name: str, params: dict, frozen_q: list[float] | None = None) -> float:
    """Divergence of teacher `p` and student `q` (probability lists). `frozen_q` is the student seen by the
    stop-gradient parts (AKL's gaps, TAID's target); by default `q` itself."""
    fq = q if frozen_q is None else frozen_q
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "jsd":
        beta = params["beta"]
        m = [(1 - beta) * b + beta * a for a, b in zip(p, q)]
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if name == "skew_forward_kl":
        alpha = params["alpha"]
        return _kl(p, [alpha * a + (1 - alpha) * b for a, b in zip(p, q)])
    if name == "skew_reverse_kl":
        alpha = params["alpha"]
        return _kl(q, [alpha * b + (1 - alpha) * a for a, b in zip(p, q)])
    if name == "tvd":
        return 0.5 * sum(abs(a - b) for a, b in zip(p, q))
    if name == "akl":
        head, cumulative = set(), 0.0
        for i in sorted(range(len(p)), key=lambda i: -p[i]):
            if cumulative >= params["mu"]:
                break
            head.add(i)
            cumulative += p[i]
        g_head = sum(abs(p[i] - fq[i]) for i in range(len(p)) if i in head)
        g_tail = sum(abs(p[i] - fq[i]) for i in range(len(p)) if i not in head)
        if g_head + g_tail == 0:
            return 0.0
        return (g_head * _kl(p, q) + g_tail * _kl(q, p)) / (g_head + g_tail)
    if name == "taid":
        t = params["taid_t"]
        # r ∝ fq^(1 − t) · p^t (the softmax of the interpolated logits); a zero on either side (t in (0, 1)) gives 0
        weights = [
            math.exp((1 - t) * math.log(b) + t * math.log(a)) if a > 0 and b > 0 else 0.0 for a, b in zip(p, fq)
        ]
        r = [w / sum(weights) for w in weights]
        return _kl(r, q)
    raise AssertionError(name)


def _loop_kd(student, teacher, mask, name, params, temperature=1.0, frozen=None) -> float:
    """Token mean over the mask of the full-vocabulary divergence, logits divided by `temperature`."""
    values = []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            q = _softmax([x / temperature for x in student[b, t].tolist()])
            p = _softmax([x / temperature for x in teacher[b, t].tolist()])
            fq = None if frozen is None else _softmax([x / temperature for x in frozen[b, t].tolist()])
            values.append(_loop_value(p, q, name, params, fq))
    return sum(values) / len(values)


def _loop_bins(z_row, ids, logprobs):
    """(K+1)-bin teacher and student lists: the K ids (ids ≥ V: probability 0 on both sides), then the rest."""
    q = _softmax(z_row)
    vocab = len(q)
    p_bins = [math.exp(lp) if i < vocab else 0.0 for i, lp in zip(ids, logprobs)]
    q_bins = [q[i] if i < vocab else 0.0 for i in ids]
    covered = all(v in ids for v in range(vocab))
    p_rest = 0.0 if covered else max(1.0 - sum(p_bins), 0.0)
    q_rest = sum(q[v] for v in range(vocab) if v not in ids)
    return p_bins + [p_rest], q_bins + [q_rest]


def _loop_topk(student, ids, logprobs, mask, name, params, frozen=None) -> float:
    values = []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            p, q = _loop_bins(student[b, t].tolist(), ids[b, t].tolist(), logprobs[b, t].tolist())
            fq = (
                None
                if frozen is None
                else _loop_bins(frozen[b, t].tolist(), ids[b, t].tolist(), logprobs[b, t].tolist())[1]
            )
            values.append(_loop_value(p, q, name, params, fq))
    return sum(values) / len(values)


def _fd_gradient(loop, student: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central differences of `loop(s, frozen=student)` at `student`: the gradient with the stop-gradient parts
    held at the current student, which is what autograd of AKL and TAID must give."""
    grad = torch.zeros_like(student)
    flat = grad.view(-1)
    for i in range(student.numel()):
        up, down = student.clone(), student.clone()
        up.view(-1)[i] += h
        down.view(-1)[i] -= h
        flat[i] = (loop(up, student) - loop(down, student)) / (2 * h)
    return grad


def _inputs(b=2, t=5, v=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(b, t, v, generator=g)).to(dtype)
    teacher = (2 * torch.randn(b, t, v, generator=g)).to(dtype)
    mask = torch.rand(b, t, generator=g) > 0.35
    mask[0, 0] = True
    return student, teacher, mask


def _signals(teacher: torch.Tensor, k: int):
    logprobs, ids = teacher.log_softmax(-1).topk(k, dim=-1)
    return ids, logprobs


# ---- full vocabulary ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_kd_loss_matches_plain_loops(name, params):
    student, teacher, mask = _inputs(seed=1)
    got = kd_loss(student, teacher, mask, name, temperature=1.7, chunk_size=3, **params)
    assert got.item() == pytest.approx(_loop_kd(student, teacher, mask, name, params, 1.7), abs=1e-10, rel=1e-10)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_kd_loss_gradient_matches_finite_differences_of_the_loops(name, params):
    """Every divergence, AKL and TAID included: the gradient is the loop's derivative with the detached parts held."""
    student, teacher, mask = _inputs(b=2, t=3, v=5, seed=4)
    s = student.clone().requires_grad_(True)
    kd_loss(s, teacher, mask, name, temperature=1.3, chunk_size=2, **params).backward()
    want = _fd_gradient(lambda x, frozen: _loop_kd(x, teacher, mask, name, params, 1.3, frozen), student)
    torch.testing.assert_close(s.grad, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(("name", "params"), PLAIN, ids=[i for i, c in zip(IDS, CASES) if c in PLAIN])
def test_kd_loss_gradcheck(name, params):
    student, teacher, mask = _inputs(b=2, t=3, v=5, seed=4)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: kd_loss(s, teacher, mask, name, temperature=1.3, chunk_size=2, **params), (student,)
    )


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_chunk_size_does_not_change_value_or_gradient(name, params):
    student, teacher, mask = _inputs(b=3, t=6, v=11, seed=5)
    results = []
    for chunk_size in (1, 2, 5, 1000, None):
        s = student.clone().requires_grad_(True)
        loss = kd_loss(s, teacher, mask, name, chunk_size=chunk_size, **params)
        loss.backward()
        results.append((loss.detach(), s.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_padding_with_garbage_changes_nothing(name, params):
    student, teacher, mask = _inputs(seed=6)
    s = student.clone().requires_grad_(True)
    want = kd_loss(s, teacher, mask, name, **params)
    want.backward()
    garbage_s, garbage_t = student.clone(), teacher.clone()
    garbage_s[~mask] = float("nan")
    garbage_t[~mask] = float("inf")
    padded_s = torch.cat([garbage_s, torch.full_like(garbage_s[:, :2], 1e30)], dim=1).requires_grad_(True)
    padded_t = torch.cat([garbage_t, torch.full_like(garbage_t[:, :2], -1e30)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros_like(mask[:, :2])], dim=1)
    loss = kd_loss(padded_s, padded_t, padded_mask, name, **params)
    loss.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-12)
    torch.testing.assert_close(padded_s.grad[:, : mask.shape[1]][mask], s.grad[mask])
    assert torch.count_nonzero(padded_s.grad[~padded_mask]) == 0


@pytest.mark.parametrize(("name", "params"), [c for c in CASES if c[0] not in ("reverse_kl", "akl")])
def test_teacher_with_minus_inf_logits_stays_finite(name, params):
    """p = 0 on part of the vocabulary (banned or padded tokens): finite values and gradients, as the loops on a
    -1e4 clamp. Reverse KL and AKL (its tail term) are left out: KL(q ‖ p) is infinite there by definition."""
    student, teacher, mask = _inputs(seed=9)
    teacher[..., -2:] = float("-inf")
    s = student.clone().requires_grad_(True)
    loss = kd_loss(s, teacher, mask, name, **params)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert loss.item() == pytest.approx(_loop_kd(student, teacher.clamp(min=-1e4), mask, name, params), abs=1e-9)


def _token_map_node(loss: torch.Tensor):
    """The `_TokenMap` autograd node under `loss` (the chunked map every divergence runs through)."""
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if type(node).__name__ == "_TokenMapBackward":
            return node
        stack += [child for child, _ in node.next_functions if child is not None]
    raise AssertionError("no chunked_token_map node under the loss")


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_the_gradient_is_the_one_buffer_written_in_the_forward(name, params):
    """Memory bound: every divergence, full and top-k, runs through `chunked_token_map`, and the student's gradient
    is the buffer its forward filled chunk by chunk (no other full-size tensor survives the forward)."""
    student, teacher, mask = _inputs(seed=13)
    ids, logprobs = _signals(teacher, 3)
    for loss_fn in (
        lambda s: kd_loss(s, teacher, mask, name, chunk_size=2, **params),
        lambda s: topk_kd_loss(s, ids, logprobs, mask, chunk_size=2, divergence=name, **params),
    ):
        s = student.clone().requires_grad_(True)
        loss = loss_fn(s)
        saved = _token_map_node(loss).saved_tensors  # (b_idx, t_idx, gradient of the student)
        assert len(saved) == 3 and saved[2].shape == s.shape
        stored_ptr = saved[2].data_ptr()
        del saved  # a live reference would make the leaf copy the gradient instead of keeping it
        loss.backward()
        assert s.grad.data_ptr() == stored_ptr


def _grad(name: str, student, teacher, mask, **params) -> tuple[float, torch.Tensor]:
    s = student.clone().requires_grad_(True)
    loss = kd_loss(s, teacher, mask, name, **params)
    loss.backward()
    return loss.item(), s.grad


def test_special_cases_reduce_to_the_plain_kls():
    student, teacher, mask = _inputs(seed=2)
    fwd, fwd_grad = _grad("forward_kl", student, teacher, mask)
    rev, rev_grad = _grad("reverse_kl", student, teacher, mask)
    for name, params, value, grad in [
        ("taid", {"taid_t": 1.0}, fwd, fwd_grad),  # the target is the teacher itself
        ("skew_forward_kl", {"alpha": 0.0}, fwd, fwd_grad),
        ("skew_reverse_kl", {"alpha": 0.0}, rev, rev_grad),
        ("akl", {"mu": 1.0}, fwd, fwd_grad),  # every token in the head
        ("akl", {"mu": 0.0}, rev, rev_grad),  # every token in the tail
        ("jsd", {"beta": 0.0}, fwd, fwd_grad),
        ("jsd", {"beta": 1.0}, rev, rev_grad),
    ]:
        got, got_grad = _grad(name, student, teacher, mask, **params)
        assert got == pytest.approx(value, abs=1e-12), (name, params)
        torch.testing.assert_close(got_grad, grad, rtol=1e-9, atol=1e-12)
    # the other endpoints: the target (TAID t = 0) or the mixture (skew α = 1) is the distribution it is compared to
    for name, params in [
        ("taid", {"taid_t": 0.0}),
        ("skew_forward_kl", {"alpha": 1.0}),
        ("skew_reverse_kl", {"alpha": 1.0}),
    ]:
        got, got_grad = _grad(name, student, teacher, mask, **params)
        assert got == pytest.approx(0.0, abs=1e-12), (name, params)
        assert torch.count_nonzero(got_grad.abs() > 1e-12) == 0, (name, params)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_identical_distributions_give_zero(name, params):
    student, _, mask = _inputs(seed=10)
    assert kd_loss(student, student + 3.0, mask, name, **params).item() == pytest.approx(0.0, abs=1e-12)


def test_tvd_is_bounded_by_one_and_symmetric():
    student, teacher, mask = _inputs(seed=11)
    tvd = kd_loss(student, teacher, mask, "tvd").item()
    assert 0 < tvd <= 1
    assert kd_loss(teacher, student, mask, "tvd").item() == pytest.approx(tvd, abs=1e-12)


def test_akl_lies_between_its_two_kls():
    student, teacher, mask = _inputs(seed=12)
    per = {
        name: kd_loss(student, teacher, mask, name, reduction="none", **params)
        for name, params in [("forward_kl", {}), ("reverse_kl", {}), ("akl", {"mu": 0.5})]
    }
    low = torch.minimum(per["forward_kl"], per["reverse_kl"])
    high = torch.maximum(per["forward_kl"], per["reverse_kl"])
    assert ((per["akl"] >= low - 1e-12) & (per["akl"] <= high + 1e-12)).all()


def test_bf16_inputs_compute_in_float32_for_the_new_divergences():
    student, teacher, mask = _inputs(b=2, t=8, v=64, seed=7, dtype=torch.float32)
    for name, params in CASES:
        s16 = student.bfloat16().requires_grad_(True)
        loss16 = kd_loss(s16, teacher.bfloat16(), mask, name, **params)
        loss16.backward()
        assert loss16.dtype == torch.float32 and s16.grad.dtype == torch.bfloat16
        ref = kd_loss(student.bfloat16().float(), teacher.bfloat16().float(), mask, name, **params)
        assert loss16.item() == pytest.approx(ref.item(), rel=1e-6)


# ---- the hand-checked 3-token example of docs/methods/kd.md --------------------------------------------------------

P3, Q3 = [0.6, 0.3, 0.1], [0.3, 0.2, 0.5]  # teacher, student
HAND = [
    ("forward_kl", {}, 0.376584),
    ("reverse_kl", {}, 0.515682),
    ("jsd", {"beta": 0.5}, 0.103295),
    ("skew_forward_kl", {"alpha": 0.1}, 0.313099),
    ("skew_reverse_kl", {"alpha": 0.1}, 0.369614),
    ("tvd", {}, 0.4),
    ("akl", {"mu": 0.5}, 0.463520),
    ("taid", {"taid_t": 0.5}, 0.132139),
]


@pytest.mark.parametrize(("name", "params", "value"), HAND, ids=[h[0] for h in HAND])
def test_docs_three_token_example(name, params, value):
    student = torch.tensor([[Q3]], dtype=torch.float64).log()  # logits = ln q (any shift gives the same q)
    teacher = torch.tensor([[P3]], dtype=torch.float64).log() + 1.0
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert kd_loss(student, teacher, mask, name, **params).item() == pytest.approx(value, abs=1e-6)


def test_docs_three_token_example_top1():
    """Top-1 cache of the same example: bins (id 0, rest) = teacher (0.6, 0.4), student (0.3, 0.7)."""
    student = torch.tensor([[Q3]], dtype=torch.float64).log()
    ids, logprobs = torch.tensor([[[0]]]), torch.tensor([[[math.log(0.6)]]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert topk_kd_loss(student, ids, logprobs, mask).item() == pytest.approx(0.192042, abs=1e-6)
    assert topk_kd_loss(student, ids, logprobs, mask, divergence="tvd").item() == pytest.approx(0.3, abs=1e-12)
    assert topk_kd_loss(student, ids, logprobs, mask, divergence="reverse_kl").item() == pytest.approx(
        0.183787, abs=1e-6
    )


# ---- top-k cache ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("k", [1, 3])
def test_topk_matches_plain_loops(name, params, k):
    student, teacher, mask = _inputs(v=9, seed=20 + k)
    ids, logprobs = _signals(teacher, k)
    ids[0, 0, 0] = 12  # a padded teacher head's id: no student slot, its mass goes to the rest bin
    got = topk_kd_loss(student, ids, logprobs, mask, chunk_size=3, divergence=name, **params)
    assert got.item() == pytest.approx(_loop_topk(student, ids, logprobs, mask, name, params), abs=1e-10)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_topk_gradient_matches_finite_differences_of_the_loops(name, params):
    student, teacher, mask = _inputs(b=1, t=3, v=6, seed=23)
    ids, logprobs = _signals(teacher, 3)
    s = student.clone().requires_grad_(True)
    topk_kd_loss(s, ids, logprobs, mask, chunk_size=2, divergence=name, **params).backward()
    want = _fd_gradient(lambda x, frozen: _loop_topk(x, ids, logprobs, mask, name, params, frozen), student)
    torch.testing.assert_close(s.grad, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(("name", "params"), PLAIN, ids=[i for i, c in zip(IDS, CASES) if c in PLAIN])
def test_topk_gradcheck(name, params):
    student, teacher, mask = _inputs(b=1, t=3, v=6, seed=23)
    ids, logprobs = _signals(teacher, 3)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: topk_kd_loss(s, ids, logprobs, mask, chunk_size=2, divergence=name, **params), (student,)
    )


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_topk_with_k_equal_v_is_the_full_vocabulary_loss(name, params):
    student, teacher, mask = _inputs(v=7, seed=24)
    ids, logprobs = _signals(teacher, 7)
    s_top, s_full = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    top = topk_kd_loss(s_top, ids, logprobs, mask, divergence=name, **params)
    full = kd_loss(s_full, teacher, mask, name, **params)
    top.backward()
    full.backward()
    assert top.item() == pytest.approx(full.item(), abs=1e-10)
    torch.testing.assert_close(s_top.grad, s_full.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_topk_chunking_and_padding_change_nothing(name, params):
    student, teacher, mask = _inputs(v=9, seed=25)
    ids, logprobs = _signals(teacher, 4)
    want = topk_kd_loss(student, ids, logprobs, mask, divergence=name, **params).item()
    for chunk_size in (1, 4, 1000):
        got = topk_kd_loss(student, ids, logprobs, mask, chunk_size=chunk_size, divergence=name, **params)
        assert got.item() == pytest.approx(want, abs=1e-12)
    garbage_s, garbage_ids, garbage_lps = student.clone(), ids.clone(), logprobs.clone()
    garbage_s[~mask], garbage_ids[~mask], garbage_lps[~mask] = float("nan"), -1, float("inf")
    s = garbage_s.requires_grad_(True)
    loss = topk_kd_loss(s, garbage_ids, garbage_lps, mask, divergence=name, **params)
    loss.backward()
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert torch.count_nonzero(s.grad[~mask]) == 0 and torch.isfinite(s.grad[mask]).all()


def test_topk_forward_kl_generic_bins_agree_with_the_paper_rows():
    """The shared (K+1)-bin path reproduces DCKD's own paper rows for forward KL (skew α = 0 goes through it)."""
    student, teacher, mask = _inputs(v=9, seed=26)
    ids, logprobs = _signals(teacher, 4)
    paper = topk_kd_loss(student, ids, logprobs, mask).item()
    generic = topk_kd_loss(student, ids, logprobs, mask, divergence="skew_forward_kl", alpha=0.0).item()
    assert generic == pytest.approx(paper, abs=1e-12)


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_errors_name_the_divergence_and_its_parameters():
    student, teacher, mask = _inputs()
    ids, logprobs = _signals(teacher, 3)
    with pytest.raises(ValueError, match=r"unknown divergence 'kl'; expected one of .*akl \(mu=0\.5\)"):
        kd_loss(student, teacher, mask, "kl")
    with pytest.raises(ValueError, match=r"divergence forward_kl \(no parameters\) does not take mu"):
        kd_loss(student, teacher, mask, "forward_kl", mu=0.5)
    with pytest.raises(ValueError, match=r"divergence tvd \(no parameters\) does not take beta"):
        kd_loss(student, teacher, mask, "tvd", beta=0.5)
    with pytest.raises(ValueError, match=r"divergence skew_forward_kl \(alpha=0\.1\) does not take mu"):
        kd_loss(student, teacher, mask, "skew_forward_kl", mu=0.3)
    with pytest.raises(ValueError, match=r"divergence taid \(taid_t\) needs taid_t"):
        kd_loss(student, teacher, mask, "taid")
    for name, params in [("skew_reverse_kl", {"alpha": 1.5}), ("akl", {"mu": -0.1}), ("taid", {"taid_t": 2.0})]:
        ((param, value),) = params.items()
        with pytest.raises(ValueError, match=rf"{name} {param} must lie in \[0, 1\], found {value}"):
            kd_loss(student, teacher, mask, name, **params)
        with pytest.raises(ValueError, match=rf"{name} {param} must lie in \[0, 1\], found {value}"):
            topk_kd_loss(student, ids, logprobs, mask, divergence=name, **params)
    with pytest.raises(ValueError, match="akl mu must lie in"):
        kd_loss(student, teacher, mask, "akl", mu=float("nan"))
    with pytest.raises(ValueError, match=r"divergence forward_kl \(no parameters\) does not take beta"):
        topk_kd_loss(student, ids, logprobs, mask, divergence="forward_kl", beta=0.5)
    with pytest.raises(ValueError, match="mode 'official' .* only supports divergence forward_kl, found 'tvd'"):
        topk_kd_loss(student, ids, logprobs, mask, mode="official", divergence="tvd")
    with pytest.raises(ValueError, match="unknown divergence 'tv'"):
        topk_kd_loss(student, ids, logprobs, mask, divergence="tv")


def test_historic_beta_is_still_ignored_by_the_plain_kls():
    """Callers passed `beta` with every divergence before the family grew: forward and reverse KL ignore it."""
    student, teacher, mask = _inputs()
    for name in ("forward_kl", "reverse_kl"):
        assert kd_loss(student, teacher, mask, name, beta=0.3).item() == kd_loss(student, teacher, mask, name).item()
