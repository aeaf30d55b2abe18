"""Benchmark: distillation losses from hidden states + LM heads — fused vs logits path vs naive vs TRL.

Forward KL(teacher ‖ student) from `student_hidden [1, T, H]`, `student_weight [V, H]` (both trained) and a frozen
teacher of the same shapes, forward + backward, one fresh process per variant, side by side in one run:
- `naive`: both heads projected to full logits, full float32 `log_softmax` KL (`bench.loss_kernels.naive_kd`);
- `logits_path`: today's trainers: both heads projected to full logits (the teacher's under no_grad), then the
  chunked `kd_loss`;
- `fused`: `align_distill.losses.fused_kd_loss` (vocabulary tiles, no `[T, V]` tensor);
- `trl`: TRL's `trl.trainer.distillation_trainer._chunked_divergence_loss` with β = 0 (its forward KL).

Memory: `bench.common.measure_backward` (peak RSS of the fresh process after the first forward + backward minus
the RSS once the inputs exist: `extra_mb`, gradients included). `input_grads_mb` = the size of the gradients the
step must return (student hidden states + head weight, in the inputs' dtype). Goals (issue 18): fused extra
memory ≤ 0.25× TRL's and ≤ 2× `input_grads_mb`, fused time ≤ 1.0× TRL's; each row says whether they are met.

Run: `flock /tmp/align-distill-bench.lock python -m bench.fused_losses --json bench/fused_losses.json`. The big
size (V = 151936, H = 896) runs at T = 1024 in fp32 (`--big-seq`) and T = 256 in bf16 (`--big-seq-bf16`) on CPU:
at T = 4096 the naive variant alone needs ~15 GiB, and this CPU has no native bf16 matmul, so the bf16 logits
variants take minutes per step even at the small size (bf16 runs time the first step only, `--bf16-repeats`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

from bench.common import measure_backward, run_worker

VARIANTS = ("naive", "logits_path", "fused", "trl")
SIZES = {"small": {"vocab": 49152, "seq": 2048, "hidden": 576}, "big": {"vocab": 151936, "seq": 1024, "hidden": 896}}
OUT = Path(__file__).parent


# ---- worker side (runs in the subprocess) -------------------------------------------------------------------------


def _loss_fn(name: str):
    import torch

    from align_distill.losses import fused_kd_loss, kd_loss
    from bench.loss_kernels import naive_kd

    if name == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        return lambda hs, ws, ht, wt, mask: _chunked_divergence_loss(hs, ht, ws, wt, mask, beta=0.0)[0]
    if name == "fused":
        return fused_kd_loss

    def logits_loss(hs, ws, ht, wt, mask):
        with torch.no_grad():
            teacher = ht @ wt.T
        student = hs @ ws.T
        return naive_kd(student, teacher, mask) if name == "naive" else kd_loss(student, teacher, mask)

    return logits_loss


def _worker(args: argparse.Namespace) -> dict:
    import torch

    fn = _loss_fn(args.worker)  # imports before the memory baseline
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    scale = args.hidden**-0.5 * 4  # logits of std ~4: peaked distributions like a trained head's

    def tensor(*shape: int, grad: bool = False) -> torch.Tensor:
        out = torch.randn(shape, generator=g).to(dtype)
        return out.requires_grad_(True) if grad else out

    hs, ht = tensor(1, args.seq, args.hidden, grad=True), tensor(1, args.seq, args.hidden)
    ws = (tensor(args.vocab, args.hidden) * scale).requires_grad_(True)
    wt = tensor(args.vocab, args.hidden) * scale
    mask = torch.ones(1, args.seq, dtype=torch.bool)

    def clear_grads() -> None:
        hs.grad = ws.grad = None

    result = measure_backward(lambda: fn(hs, ws, ht, wt, mask), clear_grads, args.repeats)
    grads_mb = (hs.numel() + ws.numel()) * hs.element_size() / 2**20
    return {"name": args.worker, "input_grads_mb": grads_mb, **result}


# ---- driver side --------------------------------------------------------------------------------------------------


def _rows(opts: argparse.Namespace, done: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Every (dtype, size) group, fp32 first; `done(rows so far)` after each group (the JSON is rewritten then)."""
    rows = []
    for dtype in opts.dtypes.split(","):
        for size in opts.sizes.split(","):
            shape = dict(SIZES[size])
            if size == "big":
                shape["seq"] = opts.big_seq_bf16 if dtype == "bfloat16" else opts.big_seq
            repeats = opts.bf16_repeats if dtype == "bfloat16" else opts.repeats
            results = {}
            for name in opts.variants.split(","):
                args = ["--worker", name, "--dtype", dtype, "--repeats", str(repeats)]
                args += [f"--{key}={value}" for key, value in shape.items()]
                results[name] = run_worker("bench.fused_losses", args, opts.timeout)
                print(
                    name,
                    size,
                    dtype,
                    f"{statistics.median(results[name]['times_s']):.2f} s",
                    f"{results[name]['extra_mb']:.0f} MiB",
                    flush=True,
                )
            trl = results["trl"]  # the baseline: --variants must include it
            for name, r in results.items():
                time_s = statistics.median(r["times_s"])
                trl_time = statistics.median(trl["times_s"])
                row = {
                    "bench": "fused_losses",
                    "variant": name,
                    "size": size,
                    **shape,
                    "dtype": dtype,
                    "loss": r["loss"],
                    "time_s_median": time_s,
                    "first_s": r["first_s"],
                    "extra_mb": r["extra_mb"],
                    "input_grads_mb": r["input_grads_mb"],
                    "time_ratio_vs_trl": time_s / trl_time,
                    "mem_ratio_vs_trl": r["extra_mb"] / max(trl["extra_mb"], 1e-9),
                    "mem_ratio_vs_input_grads": r["extra_mb"] / r["input_grads_mb"],
                    "threads": r["threads"],
                }
                if name == "fused":
                    row["goals_met"] = {
                        "mem_le_0.25x_trl": row["mem_ratio_vs_trl"] <= 0.25,
                        "mem_le_2x_input_grads": row["mem_ratio_vs_input_grads"] <= 2.0,
                        "time_le_1.0x_trl": row["time_ratio_vs_trl"] <= 1.0,
                    }
                rows.append(row)
            done(rows)
    return rows


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import version

    return {"python": platform.python_version(), **{p: version(p) for p in ("torch", "trl", "transformers")}}


def run(quick: bool = True) -> list[dict]:
    """Rows for `bench/run_all.py`: the small size in float32 when `quick`, else every size and dtype."""
    argv = ["--sizes", "small", "--dtypes", "float32", "--repeats", "1"] if quick else []
    return _rows(_parser().parse_args(argv))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="small,big", help="comma-separated: small, big")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--big-seq", type=int, default=SIZES["big"]["seq"], help="T of the big size (issue: 4096)")
    p.add_argument(
        "--big-seq-bf16",
        type=int,
        default=256,
        help="T of the big size in bf16 (CPU bf16 matmuls of the "
        "logits variants are ~30x slower than fp32 here: no native bf16)",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed forward+backward runs after the first")
    p.add_argument("--bf16-repeats", type=int, default=0, help="the same in bf16 (0: the first run is timed)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset; trl is the baseline")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per variant subprocess")
    p.add_argument("--json", default=None, help="write {config, versions, rows} to this file, and the PNG beside it")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    for key in ("vocab", "seq", "hidden"):
        p.add_argument(f"--{key}", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    opts = _parser().parse_args(argv)
    if opts.worker:
        print(json.dumps(_worker(opts)))
        return
    keys = ("sizes", "dtypes", "big_seq", "big_seq_bf16", "repeats", "bf16_repeats", "variants")
    config = {k: getattr(opts, k) for k in keys}

    def write(rows: list[dict]) -> None:
        if opts.json:
            Path(opts.json).write_text(json.dumps({"config": config, "versions": _versions(), "rows": rows}, indent=2))

    rows = _rows(opts, write)
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    if opts.json:
        plot(Path(opts.json).stem, rows)


def plot(name: str, rows: list[dict]) -> None:
    """bench/<name>.png: time and memory vs TRL per variant, dtype and size (the ratios vs the inputs' gradients,
    up to 50x for the logits variants, would flatten the bars that matter)."""
    from bench.run_all import plot as draw

    keep = ("time_ratio_vs_trl", "mem_ratio_vs_trl")
    draw(
        name,
        [
            {
                "variant": f"{r['variant']} {r['dtype']}",
                "size": f"V={r['vocab']} T={r['seq']}",
                **{k: r[k] for k in keep},
            }
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
