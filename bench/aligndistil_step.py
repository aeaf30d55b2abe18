"""Benchmark: one AlignDistil training step (three forwards + loss + backward) vs an unchunked implementation.

Models: the tiny presets of `align_distill.models.tiny` (student `student`, DPO and reverse-DPO models `teacher`,
random weights) with a vocabulary of `vocab` tokens; one right-padded sequence of `seq` tokens whose last
`response_fraction` are the response. The step is forward + backward of the student, under no_grad for the two
teachers; no optimizer step (identical in every variant).

Variants:
- `naive`: what the official trainers do (docs/methods/aligndistil.md §6.3): full `[B, L, V]` logits of all three
  models,
  the loss on full tensors (`bench.loss_kernels._naive_aligndistil`: probabilities, log-probabilities, teacher
  logits, products), rows selected by the mask afterwards.
- `fused`: `align_distill.trainers.aligndistil.batch_loss`, the trainer's own code with its defaults
  (`fused_lm_head`): the three forwards stop at the final hidden states and `fused_aligndistil_loss` projects the
  heads in vocabulary tiles (no `[rows, V]` logits at all).
- `chunked`: the logits path's memory saver (`fused_lm_head=False`, `blockwise_lm_head` automatic): the scored rows
  are projected to logits one block at a time, each block going through `aligndistil_loss` (chunked, forward-time
  gradients).
- `chunked_span_logits`: the same with `blockwise_lm_head=False`: the models' forwards project the span of scored
  rows (`logits_to_keep`), the chunked loss runs on those `[B, span, V]` logits.
- `chunked_full_logits`: the chunked loss on full logits (no `logits_to_keep`), to separate the effects.

Memory: each variant runs in a fresh subprocess (the method of `bench/loss_kernels.py`): `extra_mb` = peak RSS −
RSS after building the models and the batch, i.e. what the step adds (logits, activations, gradients). Time: median
of `repeats` steps after a first one. Goals (issue 5): the default ≤ 0.3× naive peak memory, ≤ 1.1× time.

Run: `python -m bench.aligndistil_step` (V=49152, T=1024) or `--quick` (V=8192, T=256); `run(quick)` returns rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
from types import SimpleNamespace

from bench.common import run_worker

VARIANTS = ["naive", "fused", "chunked", "chunked_span_logits", "chunked_full_logits"]
QUICK = {"seq": 256, "vocab": 8192}
ISSUE = {"seq": 1024, "vocab": 49152}


class _Vocabulary:
    """What `build_tiny_causal_lm` reads from a tokenizer: its length and two special ids."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def _models(vocab: int, seq: int):
    from align_distill.models.tiny import build_tiny_causal_lm

    tokens = _Vocabulary(vocab)
    student = build_tiny_causal_lm(tokens, "student", seed=0, max_position_embeddings=seq)
    teachers = [build_tiny_causal_lm(tokens, "teacher", seed=s, max_position_embeddings=seq) for s in (1, 2)]
    for teacher in teachers:
        teacher.eval().requires_grad_(False)
    return student, teachers


def _batch(vocab: int, seq: int, response_fraction: float):
    import torch

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, vocab, (1, seq), generator=g)
    completion_mask = torch.zeros(1, seq, dtype=torch.long)
    completion_mask[:, int(seq * (1 - response_fraction)) :] = 1
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask}


def _step_fn(name: str, student, teachers, batch, vocab: int, chunk_size: int | None = None):
    import torch

    from align_distill.losses import aligndistil_loss
    from align_distill.trainers.aligndistil import batch_loss
    from align_distill.trainers.common import response_view
    from bench.loss_kernels import _naive_aligndistil

    settings = SimpleNamespace(
        beta=0.1, tvd_scale=10.0, eps=1e-3, tvd_half=False, variant="adaptive", ratio=None,
        official_alignment=False, loss_chunk_size=chunk_size, blockwise_lm_head=None, fused_lm_head=False,
    )  # fmt: skip
    span = SimpleNamespace(**{**vars(settings), "blockwise_lm_head": False})
    fused_settings = SimpleNamespace(**{**vars(settings), "fused_lm_head": True})
    ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]

    def full(model):
        return model(input_ids=ids, attention_mask=attention, use_cache=False).logits

    def naive():
        logits, _, mask = response_view(full(student), ids, completion)
        with torch.no_grad():
            dpo, rev = full(teachers[0])[:, :-1], full(teachers[1])[:, :-1]
        return _naive_aligndistil(logits, dpo, rev, mask.float())

    def chunked_full_logits():
        logits, _, mask = response_view(full(student), ids, completion)
        with torch.no_grad():
            dpo, rev = full(teachers[0])[:, :-1], full(teachers[1])[:, :-1]
        return aligndistil_loss(logits, dpo, rev, mask, chunk_size=chunk_size)

    def fused():
        return batch_loss(student, teachers[0], teachers[1], batch, fused_settings, vocab)[0]

    def chunked():
        return batch_loss(student, teachers[0], teachers[1], batch, settings, vocab)[0]

    def chunked_span_logits():
        return batch_loss(student, teachers[0], teachers[1], batch, span, vocab)[0]

    table = {"naive": naive, "fused": fused, "chunked": chunked, "chunked_span_logits": chunked_span_logits}
    return {**table, "chunked_full_logits": chunked_full_logits}[name]


def _worker(opts: argparse.Namespace) -> dict:
    import torch

    from bench.common import measure_backward

    if opts.threads:
        torch.set_num_threads(opts.threads)
    student, teachers = _models(opts.vocab, opts.seq)
    batch = _batch(opts.vocab, opts.seq, opts.response_fraction)
    fn = _step_fn(opts.worker, student, teachers, batch, opts.vocab, opts.chunk_size)

    def grad_norm() -> dict:
        return {"grad_norm": float(sum(p.grad.norm() ** 2 for p in student.parameters()) ** 0.5)}

    def clear_grads() -> None:
        student.zero_grad(set_to_none=True)

    return {"name": opts.worker, **measure_backward(fn, clear_grads, opts.repeats, after_first=grad_norm)}


def _spawn(name: str, opts: argparse.Namespace) -> dict:
    args = ["--worker", name, "--seq", str(opts.seq), "--vocab", str(opts.vocab), "--repeats", str(opts.repeats)]
    args += ["--response-fraction", str(opts.response_fraction)]
    if opts.threads:
        args += ["--threads", str(opts.threads)]
    if opts.chunk_size:
        args += ["--chunk-size", str(opts.chunk_size)]
    return run_worker("bench.aligndistil_step", args, opts.timeout)


def _rows(opts: argparse.Namespace) -> list[dict]:
    results = [_spawn(name, opts) for name in VARIANTS]
    base = results[0]
    rows = []
    for r in results:
        median = statistics.median(r["times_s"])
        rows.append(
            {
                "bench": "aligndistil_step",
                "variant": r["name"],
                "seq": opts.seq,
                "vocab": opts.vocab,
                "response_fraction": opts.response_fraction,
                "chunk_size": opts.chunk_size,
                "loss": r["loss"],
                "grad_norm": r["grad_norm"],
                "time_s_median": median,
                "time_s_min": min(r["times_s"]),
                "time_s_max": max(r["times_s"]),
                "extra_mb": r["extra_mb"],
                "peak_rss_mb": r["peak_rss_mb"],
                "time_ratio_vs_naive": median / statistics.median(base["times_s"]),
                "mem_ratio_vs_naive": r["extra_mb"] / max(base["extra_mb"], 1e-9),
                "threads": r["threads"],
            }
        )
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small sizes {QUICK}")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (prompt + response)")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--response-fraction", type=float, default=0.75, help="response share of the sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after the first")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--chunk-size", type=int, default=None, help="loss rows per chunk (default: the library's)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per variant subprocess")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def _resolve(opts: argparse.Namespace) -> argparse.Namespace:
    sizes = QUICK if opts.quick else ISSUE
    opts.seq = opts.seq or sizes["seq"]
    opts.vocab = opts.vocab or sizes["vocab"]
    return opts


def run(quick: bool = True) -> list[dict]:
    """Rows for `bench/run_all.py`: V=8192, T=256 when `quick`, else the issue's V=49152, T=1024."""
    return _rows(_resolve(_parser().parse_args(["--quick"] if quick else [])))


def main(argv: list[str] | None = None) -> None:
    opts = _resolve(_parser().parse_args(argv))
    if opts.worker:
        print(json.dumps(_worker(opts)))
        return
    rows = _rows(opts)
    print(f"{'variant':<22}{'T×V':>12}{'loss':>11}{'median s':>10}{'extra MiB':>11}{'time×':>7}{'mem×':>7}")
    for r in rows:
        print(
            f"{r['variant']:<22}{r['seq']}×{r['vocab']:<6}{r['loss']:>11.6f}{r['time_s_median']:>10.3f}"
            f"{r['extra_mb']:>11.1f}{r['time_ratio_vs_naive']:>7.2f}{r['mem_ratio_vs_naive']:>7.2f}"
        )
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
