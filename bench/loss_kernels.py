"""Benchmark: chunked full-vocabulary losses vs plain implementations (time and peak memory, forward + backward).

Compared, on the same random inputs:
- `kd_loss` (forward KL, chunked) vs a naive full `log_softmax` KL vs TRL's `GKDTrainer.generalized_jsd_loss`
  (β = 0 is its forward KL; TRL 1.16's fused `trl.kernels.chunked_divergence` needs hidden states and LM-head
  weights rather than logits, so it is not comparable here), plus the per-chunk `torch.utils.checkpoint` design
  that `chunked_token_map` replaced (`--all`), and the JSD pair (`--all`);
- `aligndistil_loss` chunked (default chunk) vs one chunk holding every position vs a naive full-tensor version.

Memory method: every variant runs in a fresh Python subprocess. After building the inputs the worker reads its
resident set size (RSS, /proc/self/statm); after the first forward + backward it reads the process's peak RSS
(`VmHWM`, `bench.common.peak_rss_mb`). `extra_mb` = peak − RSS before = the peak memory the loss step added
on top of its inputs, including the `[B, T, V]` gradient it must return. CPU only; it measures what the process
really touched, allocator caching included. Times: `--repeats` further forward + backward runs (min/median/max).

Run: `python -m bench.loss_kernels` (small, < 1 min), `python -m bench.loss_kernels --issue-sizes` (V=49152,
T=2048, B=1; AlignDistil T=1024). `run(quick)` returns the rows for `bench/run_all.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable

from bench.common import measure_backward, run_worker

KD_VARIANTS = ["kd_naive", "kd_chunked", "trl_gkd_forward_kl"]
KD_EXTRA = ["kd_checkpoint", "jsd_chunked", "trl_gkd_jsd"]
ALIGNDISTIL_VARIANTS = ["aligndistil_naive", "aligndistil_chunked", "aligndistil_one_chunk"]
QUICK = {"batch": 1, "seq": 512, "vocab": 8192, "aligndistil_seq": 256}
ISSUE = {"batch": 1, "seq": 2048, "vocab": 49152, "aligndistil_seq": 1024}


# ---- worker side (runs in the subprocess) -------------------------------------------------------------------------


def naive_kd(student, teacher, mask):
    """Full-tensor forward KL, what a plain implementation does: two float32 log_softmaxes of [B, T, V]."""
    log_s, log_t = student.float().log_softmax(-1), teacher.float().log_softmax(-1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    return (per_token * mask).sum() / mask.sum()


def _checkpoint_kd(student, teacher, mask, chunk_size, divergence="forward_kl", beta=0.5):
    """The alternative design: gather a chunk, then recompute its float32 work in the backward (checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    from align_distill.losses.divergence import token_divergence

    b, t = mask.nonzero(as_tuple=True)
    total = student.new_zeros((), dtype=student.dtype).float()
    for start in range(0, b.numel(), chunk_size):
        rows = slice(start, start + chunk_size)
        total = total + checkpoint(
            lambda s, te: token_divergence(s.float(), te.float(), divergence, beta).sum(),
            student[b[rows], t[rows]],
            teacher[b[rows], t[rows]],
            use_reentrant=False,
        )
    return total / b.numel()


def _naive_aligndistil(student, dpo, rev, mask, beta0=0.1, tvd_scale=10.0, eps=1e-3):
    import torch

    with torch.no_grad():
        d, r = dpo.float(), rev.float()
        alpha = tvd_scale * (d.softmax(-1) - r.softmax(-1)).abs().sum(-1) + eps
        teacher = (d + alpha.unsqueeze(-1) * (d - r)).log_softmax(-1)
    log_s = student.float().log_softmax(-1)
    kl = (log_s.exp() * (log_s - teacher)).sum(-1)
    per_seq = (beta0 / alpha * kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.mean()


def _loss_fn(name: str, chunk_size: int | None) -> tuple[Callable, int]:
    """(loss function of the inputs, number of [B, T, V] teacher-side tensors it needs)."""
    from align_distill.losses import aligndistil_loss, kd_loss
    from align_distill.losses.divergence import default_chunk_size

    if name.startswith("trl_"):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        beta = 0.0 if name == "trl_gkd_forward_kl" else 0.5

        def trl_loss(s, t, mask):
            labels = mask.long().masked_fill(~mask, -100)
            return GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta)

        return trl_loss, 1
    table = {
        "kd_naive": (naive_kd, 1),
        "kd_chunked": (lambda s, t, m: kd_loss(s, t, m, chunk_size=chunk_size), 1),
        "kd_checkpoint": (lambda s, t, m: _checkpoint_kd(s, t, m, chunk_size or default_chunk_size(s.shape[-1])), 1),
        "jsd_chunked": (lambda s, t, m: kd_loss(s, t, m, "jsd", beta=0.5, chunk_size=chunk_size), 1),
        "aligndistil_naive": (_naive_aligndistil, 2),
        "aligndistil_chunked": (lambda s, d, r, m: aligndistil_loss(s, d, r, m, chunk_size=chunk_size), 2),
        "aligndistil_one_chunk": (lambda s, d, r, m: aligndistil_loss(s, d, r, m, chunk_size=s[..., 0].numel()), 2),
    }
    return table[name]


def _worker(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    fn, n_teachers = _loss_fn(args.worker, args.chunk_size)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    student = (2 * torch.randn(shape, generator=g)).to(dtype).requires_grad_(True)
    teachers = [(2 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n_teachers)]
    mask = torch.ones(shape[:2], dtype=torch.bool)
    mask[:, : int(args.seq * (1 - args.response_fraction))] = False  # the prompt part

    def clear_grads() -> None:
        student.grad = None

    return {"name": args.worker, **measure_backward(lambda: fn(student, *teachers, mask), clear_grads, args.repeats)}


# ---- driver side --------------------------------------------------------------------------------------------------


def _spawn(name: str, sizes: dict, seq: int, opts: argparse.Namespace) -> dict:
    args = ["--worker", name, "--batch", str(sizes["batch"]), "--seq", str(seq), "--vocab", str(sizes["vocab"])]
    args += ["--repeats", str(opts.repeats), "--dtype", opts.dtype, "--response-fraction", str(opts.response_fraction)]
    if opts.chunk_size:
        args += ["--chunk-size", str(opts.chunk_size)]
    if opts.threads:
        args += ["--threads", str(opts.threads)]
    return run_worker("bench.loss_kernels", args, opts.timeout)


def _rows(opts: argparse.Namespace, sizes: dict) -> list[dict]:
    groups = [("kd", KD_VARIANTS + (KD_EXTRA if opts.all else []), sizes["seq"])]
    groups.append(("aligndistil", ALIGNDISTIL_VARIANTS, sizes["aligndistil_seq"]))
    if opts.variants:
        wanted = set(opts.variants.split(","))
        unknown = wanted - set(KD_VARIANTS + KD_EXTRA + ALIGNDISTIL_VARIANTS)
        if unknown:
            raise SystemExit(
                f"unknown --variants {sorted(unknown)}; choose from {KD_VARIANTS + KD_EXTRA + ALIGNDISTIL_VARIANTS}"
            )
        # the naive baseline of a group always runs: the ratios are relative to it
        groups = [(g, [n for i, n in enumerate(names) if i == 0 or n in wanted], seq) for g, names, seq in groups]
        groups = [(g, names, seq) for g, names, seq in groups if len(names) > 1]
    rows = []
    for group, names, seq in groups:
        results = [_spawn(name, sizes, seq, opts) for name in names]
        base = results[0]  # the naive implementation
        for r in results:
            times = r["times_s"]
            rows.append(
                {
                    "bench": "loss_kernels",
                    "group": group,
                    "variant": r["name"],
                    "batch": sizes["batch"],
                    "seq": seq,
                    "vocab": sizes["vocab"],
                    "dtype": opts.dtype,
                    "chunk_size": opts.chunk_size,
                    "loss": r["loss"],
                    "time_s_min": min(times),
                    "time_s_median": statistics.median(times),
                    "time_s_max": max(times),
                    "extra_mb": r["extra_mb"],
                    "peak_rss_mb": r["peak_rss_mb"],
                    "time_ratio_vs_naive": statistics.median(times) / statistics.median(base["times_s"]),
                    "mem_ratio_vs_naive": r["extra_mb"] / max(base["extra_mb"], 1e-9),
                    "threads": r["threads"],
                }
            )
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--issue-sizes", action="store_true", help="V=49152, T=2048, B=1 (AlignDistil T=1024)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None, help="T for the KD group")
    p.add_argument("--aligndistil-seq", type=int, default=None, help="T for the AlignDistil group")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the library's)")
    p.add_argument("--response-fraction", type=float, default=1.0, help="masked (response) share of T")
    p.add_argument("--repeats", type=int, default=3, help="timed forward+backward runs after the first")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--all", action="store_true", help="also the checkpoint design and the JSD pair")
    p.add_argument("--variants", default=None, help="comma-separated subset of variants (naive baselines always run)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per variant subprocess")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def _sizes(opts: argparse.Namespace) -> dict:
    sizes = dict(ISSUE if opts.issue_sizes else QUICK)
    for key in sizes:
        if getattr(opts, key) is not None:
            sizes[key] = getattr(opts, key)
    return sizes


def run(quick: bool = True) -> list[dict]:
    """Rows for `bench/run_all.py`: the small sizes when `quick`, else the issue sizes."""
    opts = _parser().parse_args([] if quick else ["--issue-sizes"])
    return _rows(opts, _sizes(opts))


def _print(rows: list[dict]) -> None:
    head = f"{'group':<12}{'variant':<24}{'B×T×V':>16}{'loss':>11}{'median s':>10}{'min s':>8}{'max s':>8}"
    print(head + f"{'extra MiB':>11}{'time×':>7}{'mem×':>7}")
    for r in rows:
        size = f"{r['batch']}×{r['seq']}×{r['vocab']}"
        print(
            f"{r['group']:<12}{r['variant']:<24}{size:>16}{r['loss']:>11.6f}{r['time_s_median']:>10.3f}"
            f"{r['time_s_min']:>8.3f}{r['time_s_max']:>8.3f}{r['extra_mb']:>11.1f}"
            f"{r['time_ratio_vs_naive']:>7.2f}{r['mem_ratio_vs_naive']:>7.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    opts = _parser().parse_args(argv)
    if opts.worker:
        sizes = {"batch": opts.batch, "seq": opts.seq, "vocab": opts.vocab}
        if None in sizes.values():
            raise SystemExit("--worker needs --batch, --seq and --vocab")
        print(json.dumps(_worker(opts)))
        return
    rows = _rows(opts, _sizes(opts))
    _print(rows)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
