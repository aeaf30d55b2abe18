"""Benchmark: where the `signals` job's time goes, against a raw teacher forward over the same tokens.

For each model (`tiny`: the tiny teacher; `small`: hidden 512, 8 layers, same tokenizer; `bench.common`), on the
rows of `bench/generation.py`'s signals benchmark (preference rows, batch 16, k = 50, shards of 64 rows), and on the
same rows with one response each (the chosen one as `completion`, so no prompt is shared):
- the job's and the raw forwards' response tokens/s and their ratios (`bench.generation.signals_throughput`, the
  measurement behind the 0.69× of `bench/generation.json`): `raw_forward` runs one sequence per response in the
  job's batches (the issue's yardstick), `own_forward` replays the job's own forward calls (preference rows: a row's
  responses share one sequence and its prompt, `share_prompts`), so `ratio_vs_own_forward` is the share of the job's
  time that is its forwards; `*_model_tokens` count the (padded) tokens each runs through the model;
- a breakdown of one job run (`REPEATS` runs averaged, models loaded once), by wall time inside: the teacher's
  forward (`model`), the backend's scoring around it (`score_other`: padding, masks, log_softmax, top-k, the rest
  log-mass, one numpy conversion per batch), the job's encoding of the rows for the store (`encode`: fp16 and id
  packing), and the rest of the main thread's time (`other`: input loading, fingerprints, manifest, the first shard's
  tokenization and the last shard's write, waits); in other threads, overlapped with the forwards: the
  tokenization (`tokenize`, one shard ahead) and the store's shard writes (`store_append`).

Run: `flock /tmp/align-distill-bench.lock python -m bench.signals_throughput --json bench/signals_throughput.json`
(writes `{config, versions, rows}`).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import generation_models

REPEATS = 5


def breakdown(path: Path, folder: Path, source_rows: list[dict], batch_size: int, k: int) -> dict[str, float]:
    """Seconds per job run by part (see the module docstring), from timers around the parts."""
    from align_distill.data_gen.backends.transformers_backend import TransformersGenerator
    from align_distill.data_gen.jobs import run_signals, signals, teacher_signals
    from align_distill.data_gen.store import ShardedStore

    source = folder / f"breakdown-{path.name}-{len(source_rows[0])}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in source_rows))
    teacher = TransformersGenerator(str(path), batch_size=batch_size, dtype="float32", device="cpu")
    spent: collections.Counter[str] = collections.Counter()

    def timed(owner: Any, name: str, key: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - started

        setattr(owner, name, wrapper)

    timed(signals, "tokenize_rows", "tokenize")
    timed(signals, "fp16", "encode")
    timed(teacher_signals.SignalsEncoding, "encode_ids", "encode")
    timed(teacher, "score", "score")
    timed(teacher.model, "forward", "model")
    timed(ShardedStore, "append", "store_append")
    config = {
        "input": str(source),
        "signals_top_k": k,
        "shard_size": 64,
        "progress": False,
        "teachers": [{"name": "teacher", "model": str(path), "backend_kwargs": {"batch_size": batch_size}}],
    }
    runs = iter(range(10**6))

    def job() -> None:
        out = folder / f"{source.stem}-{next(runs)}"  # one fresh store per run and model
        run_signals({**config, "output_dir": str(out)}, generators={"teacher": teacher})

    job()  # warm-up
    spent.clear()
    started = time.perf_counter()
    for _ in range(REPEATS):
        job()
    total = (time.perf_counter() - started) / REPEATS
    parts = {key: value / REPEATS for key, value in spent.items()}
    parts["score_other"] = parts.pop("score") - parts["model"]
    inside = parts["model"] + parts["score_other"] + parts["encode"]  # the main thread's measured parts
    return {
        "job_s": total,
        **{f"{key}_s": value for key, value in parts.items()},
        "other_s": total - inside,
        **{f"{key}_share": value / total for key, value in parts.items()},
    }


def completion_rows(rows: list[dict]) -> list[dict]:
    """The preference rows with one response each (the chosen one as `completion`): no prompt to share."""
    return [{"id": r["id"], "prompt": r["prompt"], "completion": r["chosen"]} for r in rows]


def rows(quick: bool = True) -> list[dict]:
    from align_distill.synthetic import preference_rows
    from bench.generation import signals_throughput

    torch.set_num_threads(1)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, path in generation_models(folder, full=not quick).items():
            for source_rows in (preference_rows(128, 11), completion_rows(preference_rows(128, 11))):
                measured, _ = signals_throughput(name, path, folder, source_rows, batch_size=16, k=50)
                out.append({**measured, **breakdown(path, folder, source_rows, 16, 50), "threads": 1})
    return out


def run(quick: bool = True) -> list[dict]:
    return rows(quick)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = rows(args.quick)
    for row in result:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    if args.json:
        from bench.fused_losses import _versions

        config = {"models": "tiny" if args.quick else "tiny,small", "rows": 128, "batch_size": 16, "top_k": 50}
        config.update(shard_size=64, repeats=REPEATS, data="preference rows (2 responses), then the same with 1")
        document = {"config": config, "versions": _versions(), "rows": result}
        Path(args.json).write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
