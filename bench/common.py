"""What several benchmarks share: memory probes, the fresh-process worker call, and the benchmark models."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    """Resident set size of this process now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process's memory so far (MiB): `VmHWM`, which starts afresh at exec, unlike
    `getrusage().ru_maxrss`, which a child started by a larger parent inherits."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no VmHWM: not Linux


def run_worker(module: str, args: list[str], timeout: float) -> dict:
    """Run `python -m module args` in a fresh process (so its peak memory is its own) and parse the JSON object it
    prints on its last line."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"bench worker {module} {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def generation_models(folder: Path, full: bool) -> dict[str, Path]:
    """The tiny teacher, and (`full`) a wider 8-layer model of the same tokenizer, saved under `folder`."""
    from transformers import AutoTokenizer

    from align_distill.models.tiny import PRESETS, TinyPreset, build_tiny_causal_lm, make_tiny_models

    paths = make_tiny_models(folder / "tiny")
    models = {"tiny": Path(paths["teacher"])}
    if full:
        PRESETS.setdefault("bench_small", TinyPreset(512, 8, 8, 1536))
        tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
        small = build_tiny_causal_lm(tokenizer, "bench_small")
        small.save_pretrained(folder / "small")
        tokenizer.save_pretrained(folder / "small")
        models["small"] = folder / "small"
    return models


def measure_backward(
    loss_fn: Callable[[], Any],
    clear_grads: Callable[[], None],
    repeats: int,
    after_first: Callable[[], dict] | None = None,
) -> dict:
    """The memory/time protocol of the loss and step benchmarks, run inside a fresh worker process.

    The first forward + backward gives the extra peak memory over the resident set before it (`extra_mb`, incl. the
    gradients it must produce) and `first_s`; then `repeats` timed forward + backward runs, gradients cleared before
    each. Returns the loss value of the first run with those numbers, plus what `after_first()` reports right after
    the first backward (e.g. a gradient norm).
    """
    import torch

    rss_before = rss_mb()
    started = time.perf_counter()
    loss = loss_fn()
    loss.backward()
    first = time.perf_counter() - started
    peak = peak_rss_mb()
    extra = after_first() if after_first is not None else {}
    times = []
    for _ in range(repeats):
        clear_grads()
        started = time.perf_counter()
        loss_fn().backward()
        times.append(time.perf_counter() - started)
    return {
        "loss": loss.item(),
        "first_s": first,
        "times_s": times or [first],
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak,
        "extra_mb": peak - rss_before,
        "threads": torch.get_num_threads(),
        **extra,
    }
