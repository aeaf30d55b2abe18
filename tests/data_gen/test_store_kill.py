"""Exactly-once under crashes: a job killed with SIGKILL at random moments and resumed gives exactly the output of
an uninterrupted run — no row lost, none duplicated, sampled rows identical."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time

import pytest

from align_distill.data_gen import load_store, run_job
from align_distill.synthetic import prompt_rows


def _own_tqdm_locks() -> None:
    """Give this forked child tqdm locks of its own. tqdm's default write lock holds a multiprocessing semaphore
    shared with the parent (and a thread lock copied in whatever state the parent's threads had it): a child killed
    while creating a progress bar would leave the semaphore taken, and the parent's next progress bar (a model
    load's) would wait for it forever."""
    import threading
    from multiprocessing import RLock

    from tqdm import tqdm
    from tqdm.std import TqdmDefaultWriteLock

    TqdmDefaultWriteLock.mp_lock, TqdmDefaultWriteLock.th_lock = RLock(), threading.RLock()
    classes = [tqdm]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if cls is tqdm or "_lock" in vars(cls):
            cls.set_lock(TqdmDefaultWriteLock())


def _job(config: dict) -> None:
    _own_tqdm_locks()
    run_job("sample", config)


def _writing(out, pid: int) -> bool:
    """Process `pid` is writing a shard or the manifest right now (its temp file exists)."""
    data = out / "data"
    return any(out.glob(f".manifest.json.tmp-{pid}")) or (data.is_dir() and any(data.glob(f".*.tmp-{pid}")))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tiny_models, tmp_path):
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in prompt_rows(40, 3)))
    common = {
        "input": str(source),
        "model": str(tiny_models["student"]),
        "n": 2,
        "temperature": 1.0,
        "max_new_tokens": 8,
        "shard_size": 2,
        "progress": False,
        "backend_kwargs": {"batch_size": 4},
    }
    started = time.perf_counter()
    reference = load_store(run_job("sample", {**common, "output_dir": str(tmp_path / "reference")})).to_list()
    duration = time.perf_counter() - started

    out = tmp_path / "killed"
    config = {**common, "output_dir": str(out)}
    context = multiprocessing.get_context("fork")  # the parent has imported torch already: no start-up cost
    rng = random.Random(0)
    kills, trial = 0, 0
    while kills < 6 and trial < 12:
        trial += 1
        child = context.Process(target=_job, args=(config,))
        child.start()
        deadline = time.perf_counter() + rng.uniform(0.05, 1.0) * duration / 8  # six kills stay under one full run
        while time.perf_counter() < deadline and child.is_alive():
            if trial % 2 == 0 and _writing(out, child.pid):
                break  # every other trial: kill in the middle of writing a shard or the manifest
            time.sleep(0.0005)
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
        child.join(60)
        assert child.exitcode is not None, "a killed job did not exit"
        kills += child.exitcode == -signal.SIGKILL
    assert kills >= 5, f"only {kills} of {trial} runs were killed before finishing; make the job longer"

    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else None
    done_before = sum(s["num_inputs"] for s in manifest["shards"]) if manifest else 0
    assert done_before < 40  # the resume below still has work to do
    resumed = load_store(run_job("sample", config)).to_list()

    assert resumed == reference
    assert len({row["id"] for row in resumed}) == 40
    manifest = json.loads((out / "manifest.json").read_text())
    covered = sorted(i for s in manifest["shards"] for start, stop in s["inputs"] for i in range(start, stop))
    assert covered == list(range(40))  # every input committed exactly once
    listed = sorted(s["file"].split("/")[-1] for s in manifest["shards"] if s["file"])
    assert sorted(p.name for p in (out / "data").iterdir()) == listed  # no orphan or temp file left
