"""Fused LM-head losses (`align_distill.losses.fused`) against the logits forms they replace.

The logits forms (`kd_loss`, `topk_kd_loss`, `adpa_loss`) are tested against plain loops in their own files; here
the fused forms must give their value and gradients (hidden states, head weight, bias) within 1e-6 in float64 for
every divergence of `DIVERGENCE_PARAMS` (read at collection time, so a divergence added there is tested here too),
pass gradcheck, and be padding- and tile-size invariant, with tied embeddings and a LoRA adapter on the head.
`fused_token_nll` (the trainers' fused SFT term) is checked against a plain loop over positions.
"""

from __future__ import annotations

import pytest
import torch

from align_distill.losses import (
    DIVERGENCE_PARAMS,
    adpa_loss,
    aligndistil_loss,
    fused_adpa_loss,
    fused_aligndistil_loss,
    fused_kd_loss,
    fused_token_nll,
    fused_topk_kd_loss,
    kd_loss,
    topk_kd_loss,
)

B, T, H, H_T, V, K = 2, 5, 6, 9, 23, 5
TILES = {"vocab_tile": 4, "row_chunk": 3}  # several tiles and chunks, a ragged last one of each
ATOL = 1e-6
# a value for every parameter, away from the endpoints (taid_t has no default)
DIVERGENCES = [(name, {k: (0.3 if v is None else v) for k, v in p.items()}) for name, p in DIVERGENCE_PARAMS.items()]
NAMES = [name for name, _ in DIVERGENCES]
# divergences whose gradient is the derivative of their value (AKL's gaps, TAID's target, TVD++'s reward are not)
PLAIN = [(n, p) for n, p in DIVERGENCES if n in ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "tvd")]
HEAD = {"student_logit_scale": 0.8, "student_softcap": 4.0}  # Cohere scale, Gemma-2 soft-capping


def _transform(z: torch.Tensor, bias=None, scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """The logits a head makes, written out for the reference: softcap(scale·(z + bias))."""
    z = z if bias is None else z + bias
    z = z * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    return {
        "hs": randn(B, T, H, grad=True),
        "ws": randn(V, H, grad=True),
        "bias": randn(V, grad=True),
        "ht": randn(B, T, H_T),
        "wt": randn(V, H_T),
        "mask": mask,
    }


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def _assert_same(fused: torch.Tensor, reference: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    torch.testing.assert_close(fused, reference, atol=ATOL, rtol=0)
    for a, b in zip(_grads(fused, tensors), _grads(reference, tensors)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,params", DIVERGENCES, ids=NAMES)
@pytest.mark.parametrize("head", [False, True], ids=["plain_head", "bias_scale_softcap_temperature"])
def test_fused_kd_equals_kd_loss(inputs, name, params, head):
    x = inputs
    extra = {"student_bias": x["bias"], "teacher_softcap": 3.0, "temperature": 1.7, **HEAD} if head else {}
    fused = fused_kd_loss(x["hs"], x["ws"], x["ht"], x["wt"], x["mask"], name, **TILES, **extra, **params)
    zs = _transform(x["hs"] @ x["ws"].T, x["bias"] if head else None, *((0.8, 4.0) if head else ()))
    zt = _transform(x["ht"] @ x["wt"].T, None, 1.0, 3.0 if head else None)
    reference = kd_loss(zs, zt, x["mask"], name, temperature=1.7 if head else 1.0, **params)
    _assert_same(fused, reference, [x["hs"], x["ws"], x["bias"]] if head else [x["hs"], x["ws"]])


@pytest.mark.parametrize("reduction", ["sequence_mean", "sum"])
def test_fused_kd_reductions(inputs, reduction):
    x = inputs
    fused = fused_kd_loss(x["hs"], x["ws"], x["ht"], x["wt"], x["mask"], "jsd", reduction=reduction, **TILES)
    reference = kd_loss(x["hs"] @ x["ws"].T, x["ht"] @ x["wt"].T, x["mask"], "jsd", reduction=reduction)
    _assert_same(fused, reference, [x["hs"], x["ws"]])


@pytest.mark.parametrize("name,params", PLAIN, ids=[n for n, _ in PLAIN])
def test_fused_kd_gradcheck(name, params):
    g = torch.Generator().manual_seed(1)
    hs, ws, bias = (
        torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((1, 3, 4), (7, 4), (7,))
    )
    ht, wt = (
        torch.randn(1, 3, 5, generator=g, dtype=torch.float64),
        torch.randn(7, 5, generator=g, dtype=torch.float64),
    )
    mask = torch.tensor([[True, False, True]])

    def loss(h, w, b):
        return fused_kd_loss(h, w, ht, wt, mask, name, student_bias=b, student_softcap=2.0, vocab_tile=3, **params)

    assert torch.autograd.gradcheck(loss, (hs, ws, bias))


def test_fused_kd_padding_and_tile_invariant(inputs):
    x = inputs
    base = fused_kd_loss(x["hs"], x["ws"], x["ht"], x["wt"], x["mask"], "skew_reverse_kl", alpha=0.2)
    base_grads = _grads(base, [x["hs"], x["ws"]])
    for tiles in ({"vocab_tile": 1, "row_chunk": 1}, {"vocab_tile": 7, "row_chunk": 2}, {"vocab_tile": V + 5}):
        other = fused_kd_loss(x["hs"], x["ws"], x["ht"], x["wt"], x["mask"], "skew_reverse_kl", alpha=0.2, **tiles)
        torch.testing.assert_close(other, base, atol=1e-12, rtol=0)
        for a, b in zip(_grads(other, [x["hs"], x["ws"]]), base_grads):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    # padding: three more positions per row, uncounted, with garbage hidden states, change nothing
    pad = lambda t: torch.cat([t, 1e3 * torch.randn(B, 3, t.shape[-1], dtype=t.dtype)], 1)  # noqa: E731
    hs_pad = pad(x["hs"].detach()).requires_grad_(True)
    mask_pad = torch.cat([x["mask"], torch.zeros(B, 3, dtype=torch.bool)], 1)
    padded = fused_kd_loss(hs_pad, x["ws"], pad(x["ht"]), x["wt"], mask_pad, "skew_reverse_kl", alpha=0.2, **TILES)
    torch.testing.assert_close(padded, base, atol=1e-12, rtol=0)
    grad_hs, grad_ws = _grads(padded, [hs_pad, x["ws"]])
    torch.testing.assert_close(grad_hs[:, :T], base_grads[0], atol=1e-12, rtol=0)
    assert torch.equal(grad_hs[:, T:], torch.zeros_like(grad_hs[:, T:]))
    torch.testing.assert_close(grad_ws, base_grads[1], atol=1e-12, rtol=0)


def _topk_signals(g: torch.Generator, k: int = K, spill: int = 2):
    """Distinct top-k ids per position (some ≥ V: a padded teacher vocabulary) and their teacher log-probs."""
    ids = torch.stack([torch.randperm(V + spill, generator=g)[:k] for _ in range(B * T)]).view(B, T, k)
    logprobs = torch.log_softmax(torch.randn(B, T, V + spill, generator=g, dtype=torch.float64), -1).gather(-1, ids)
    return ids, logprobs


@pytest.mark.parametrize("name,params", DIVERGENCES, ids=NAMES)
def test_fused_topk_equals_topk_kd_loss(inputs, name, params):
    x = inputs
    ids, logprobs = _topk_signals(torch.Generator().manual_seed(2))
    fused = fused_topk_kd_loss(
        x["hs"], x["ws"], ids, logprobs, x["mask"], divergence=name, student_bias=x["bias"], **HEAD, **TILES, **params
    )
    zs = _transform(x["hs"] @ x["ws"].T, x["bias"], 0.8, 4.0)
    reference = topk_kd_loss(zs, ids, logprobs, x["mask"], divergence=name, **params)
    _assert_same(fused, reference, [x["hs"], x["ws"], x["bias"]])


@pytest.mark.parametrize("k", [K, V], ids=["k_below_v", "k_equals_v"])
def test_fused_topk_official_and_full_coverage(inputs, k):
    x = inputs
    ids, logprobs = _topk_signals(torch.Generator().manual_seed(3), k=k, spill=0)
    for mode in ("paper", "official"):
        fused = fused_topk_kd_loss(x["hs"], x["ws"], ids, logprobs, x["mask"], mode, **TILES)
        reference = topk_kd_loss(x["hs"] @ x["ws"].T, ids, logprobs, x["mask"], mode)
        _assert_same(fused, reference, [x["hs"], x["ws"]])


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_fused_adpa_equals_adpa_loss(inputs, mode):
    x = inputs
    g = torch.Generator().manual_seed(4)
    ids, _ = _topk_signals(g)
    advantages = torch.randn(B, T, K, generator=g, dtype=torch.float64)
    fused = fused_adpa_loss(x["hs"], x["ws"], ids, advantages, x["mask"], mode, reduction="sequence_mean", **TILES)
    reference = adpa_loss(x["hs"] @ x["ws"].T, ids, advantages, x["mask"], mode, reduction="sequence_mean")
    _assert_same(fused, reference, [x["hs"], x["ws"]])


def test_fused_topk_adpa_and_aligndistil_gradcheck():
    g = torch.Generator().manual_seed(5)
    hs, ws = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((1, 3, 4), (9, 4)))
    mask = torch.tensor([[True, True, False]])
    ids = torch.tensor([[[0, 4, 9], [8, 2, 1], [0, 1, 2]]])  # 9 ≥ V goes to the rest bin
    logprobs = torch.tensor([[[-0.5, -1.5, -3.0], [-0.2, -2.5, -4.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    advantages = torch.randn(1, 3, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: fused_topk_kd_loss(h, w, ids, logprobs, mask, divergence="jsd", vocab_tile=4), (hs, ws)
    )
    assert torch.autograd.gradcheck(lambda h, w: fused_adpa_loss(h, w, ids, advantages, mask, vocab_tile=4), (hs, ws))
    dpo, rev = (torch.randn(1, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    head = ws.detach().clone()  # the teachers' heads: constants (gradcheck perturbs `ws` in place)
    assert torch.autograd.gradcheck(
        lambda h, w: fused_aligndistil_loss(h, w, dpo, head, rev, head.flip(0), mask, vocab_tile=4),
        (hs, ws),
    )


@pytest.mark.parametrize(
    "variant,extra",
    [
        ("adaptive", {}),
        ("adaptive", {"tvd_half": True, "reduction": "token_mean"}),
        ("contrastive", {"ratio": 0.7}),
        ("theorem1", {"ratio": 1.5}),
    ],
    ids=["adaptive", "adaptive_half_token_mean", "contrastive", "theorem1"],
)
def test_fused_aligndistil_equals_aligndistil_loss(inputs, variant, extra):
    """Value, gradients (hidden, weight, bias) and every statistic of `return_stats`, with a bias on each head."""
    x = inputs
    g = torch.Generator().manual_seed(9)
    other_hidden, other_weight, dpo_bias, other_bias = (
        torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((B, T, 4), (V, 4), (V,), (V,))
    )
    fused, fused_stats = fused_aligndistil_loss(
        x["hs"],
        x["ws"],
        x["ht"],
        x["wt"],
        other_hidden,
        other_weight,
        x["mask"],
        variant=variant,
        tvd_scale=0.5,
        student_bias=x["bias"],
        dpo_bias=dpo_bias,
        other_bias=other_bias,
        return_stats=True,
        **extra,
        **TILES,
    )
    other = other_hidden @ other_weight.T + other_bias
    rev, ref = (None, other) if variant == "theorem1" else (other, None)
    reference, reference_stats = aligndistil_loss(
        x["hs"] @ x["ws"].T + x["bias"],
        x["ht"] @ x["wt"].T + dpo_bias,
        rev,
        x["mask"],
        variant=variant,
        ref_logits=ref,
        tvd_scale=0.5,
        return_stats=True,
        **extra,
    )
    _assert_same(fused, reference, [x["hs"], x["ws"], x["bias"]])
    assert fused_stats.keys() == reference_stats.keys()
    for key, value in reference_stats.items():
        torch.testing.assert_close(fused_stats[key], value, atol=ATOL, rtol=0, msg=key)
    assert reference_stats["kl"].item() > 0  # a real comparison: the student is not the teacher


def test_tied_embedding_gets_both_gradients(inputs):
    """Student head = its input embedding: the embedding's gradient sums the lookup's and the head's parts."""
    x = inputs
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(6))

    def step(fused: bool) -> torch.Tensor:
        embedding = torch.nn.Embedding(V, H, dtype=torch.float64)
        with torch.no_grad():
            embedding.weight.copy_(x["ws"])
        hidden = torch.tanh(embedding(tokens))  # a stand-in for the transformer
        if fused:
            loss = fused_kd_loss(hidden, embedding.weight, x["ht"], x["wt"], x["mask"], **TILES)
        else:
            loss = kd_loss(hidden @ embedding.weight.T, x["ht"] @ x["wt"].T, x["mask"])
        loss.backward()
        return embedding.weight.grad

    torch.testing.assert_close(step(True), step(False), atol=ATOL, rtol=0)


def test_lora_on_the_head_trains_a_and_b(inputs):
    """weight = W + s·B·A (a LoRA adapter on the head): the gradient reaches A and B, as on the logits path."""
    x = inputs
    g = torch.Generator().manual_seed(7)
    lora_a = torch.randn(2, H, generator=g, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(V, 2, generator=g, dtype=torch.float64, requires_grad=True)
    frozen = x["ws"].detach()
    ids, logprobs = _topk_signals(g)

    def losses(fused: bool) -> torch.Tensor:
        weight = frozen + 0.5 * lora_b @ lora_a
        if fused:
            return fused_topk_kd_loss(x["hs"], weight, ids, logprobs, x["mask"], **TILES)
        return topk_kd_loss(x["hs"] @ weight.T, ids, logprobs, x["mask"])

    fused_grads, reference_grads = _grads(losses(True), [lora_a, lora_b]), _grads(losses(False), [lora_a, lora_b])
    for a, b in zip(fused_grads, reference_grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_no_grad_bf16_and_gradient_scaling(inputs):
    x = inputs
    with torch.no_grad():
        value = fused_kd_loss(x["hs"], x["ws"], x["ht"], x["wt"], x["mask"], "tvd", **TILES)
    reference = kd_loss(x["hs"] @ x["ws"].T, x["ht"] @ x["wt"].T, x["mask"], "tvd")
    torch.testing.assert_close(value, reference.detach(), atol=ATOL, rtol=0)
    assert not value.requires_grad
    # bf16 inputs: float32 work inside, bf16 gradients out, close to the float64 result
    hs = x["hs"].detach().bfloat16().requires_grad_(True)
    ws = x["ws"].detach().bfloat16().requires_grad_(True)
    loss = fused_kd_loss(hs, ws, x["ht"].bfloat16(), x["wt"].bfloat16(), x["mask"], **TILES)
    (2.5 * loss).backward()  # an incoming gradient ≠ 1 (gradient accumulation) scales the stored gradients
    exact = kd_loss(x["hs"] @ x["ws"].T, x["ht"] @ x["wt"].T, x["mask"])
    exact_hs, exact_ws = _grads(2.5 * exact, [x["hs"], x["ws"]])
    assert hs.grad.dtype == ws.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), exact.detach(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(ws.grad.double(), exact_ws, atol=0.02, rtol=0.05)
    torch.testing.assert_close(hs.grad.double(), exact_hs, atol=0.02, rtol=0.05)


def test_errors_name_the_fix(inputs):
    x = inputs
    with pytest.raises(ValueError, match="reduction 'none' is not supported"):
        fused_kd_loss(x["hs"], x["ws"], x["ht"], x["wt"], x["mask"], reduction="none")
    with pytest.raises(ValueError, match="slice a padded teacher head"):
        fused_kd_loss(x["hs"], x["ws"], x["ht"], torch.cat([x["wt"], x["wt"][:2]]), x["mask"])
    with pytest.raises(ValueError, match=r"student weight must be \[V, H\]"):
        fused_kd_loss(x["hs"], x["ws"][:, :3], x["ht"], x["wt"], x["mask"])
    with pytest.raises(ValueError, match="does not take"):
        fused_kd_loss(x["hs"], x["ws"], x["ht"], x["wt"], x["mask"], "tvd", beta=0.5)
    ids, logprobs = _topk_signals(torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match="only supports divergence forward_kl"):
        fused_topk_kd_loss(x["hs"], x["ws"], ids, logprobs, x["mask"], "official", divergence="jsd")


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum"])
def test_fused_token_nll_equals_a_plain_loop(reduction):
    """`fused_token_nll` (the trainers' fused SFT term) against a loop over positions in float64: value and the
    gradients of hidden states, weight and bias, with tiles smaller than the vocabulary and the rows."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(37, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 37, (3, 5), generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[0] = False  # a row with no counted token
    fused = fused_token_nll(hidden, weight, labels, mask, reduction=reduction, bias=bias, vocab_tile=8, row_chunk=3)
    per_row = []
    for b in range(3):
        terms = []
        for t in range(5):
            if mask[b, t]:
                logits = weight @ hidden[b, t] + bias
                terms.append(torch.logsumexp(logits, 0) - logits[labels[b, t]])
        per_row.append(terms)
    flat = [x for terms in per_row for x in terms]
    if reduction == "token_mean":
        expected = sum(flat) / len(flat)
    elif reduction == "sum":
        expected = sum(flat)
    else:
        means = [sum(terms) / len(terms) for terms in per_row if terms]
        expected = sum(means) / len(means)
    got = torch.autograd.grad(fused, (hidden, weight, bias))
    want = torch.autograd.grad(expected, (hidden, weight, bias))
    assert fused.item() == pytest.approx(expected.item(), rel=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tile", [(torch.float32, "VOCAB_TILE"), (torch.bfloat16, "VOCAB_TILE_16BIT")])
def test_default_vocabulary_tile_follows_the_head_dtype(dtype, tile):
    """16-bit heads get the half-width default tile (their gradients are half the size, the float32 tiles are not);
    an explicit `vocab_tile` wins either way."""
    from align_distill.losses import fused

    head = fused.Head(torch.zeros(3, 4, dtype=dtype), torch.zeros(50_000, 4, dtype=dtype))
    assert fused.VOCAB_TILE_16BIT < fused.VOCAB_TILE
    assert fused._plan(head, torch.float32, None, None).vocab_tile == getattr(fused, tile)
    assert fused._plan(head, torch.float32, 300, None).vocab_tile == 300
