"""bench/gpu_check.py: the CPU dry run exercises every code path of the one-shot GPU check, in a process where
trl, datasets, pyarrow, deepspeed and vllm cannot be imported (as on a stock CUDA PyTorch image); the real sizes
run only with CUDA. No timing assertions: the numbers are reported, not judged."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ABSENT_ON_GPU_IMAGE = ["trl", "datasets", "pyarrow", "deepspeed", "vllm"]
# Runs bench.gpu_check as __main__ with those packages made unimportable (None in sys.modules).
BLOCKED_MAIN = (
    "import runpy, sys\n"
    f"for name in {ABSENT_ON_GPU_IMAGE!r}:\n"
    "    sys.modules[name] = None\n"
    "sys.argv = ['bench.gpu_check', *sys.argv[1:]]\n"
    "runpy.run_module('bench.gpu_check', run_name='__main__', alter_sys=True)\n"
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_report(report: dict[str, Any], cuda: bool) -> None:
    """Every section present, no errors, every number the report is for finite (and positive where it must be)."""
    assert report["errors"] == {}
    assert _finite(report["env"]["peak_tflops"])

    a = report["distill_step"]
    assert [row["mode"] for row in a["rows"]] == ["sft", "live", "cache"]
    for row in a["rows"]:
        for key in ["step_s", "tokens_per_s", "vs_sft", "mfu", "mfu_with_teacher", "loss"]:
            assert _finite(row[key]) and row[key] > 0, (row["mode"], key, row[key])
        if cuda:
            assert _finite(row["peak_mem_gb"])
    assert a["rows"][0]["vs_sft"] == 1.0
    assert a["rows"][1]["mfu_with_teacher"] > a["rows"][1]["mfu"]  # live adds the teacher forward
    assert _finite(a["cache_build_s"]) and a["student_params"] < a["teacher_params"]

    b = report["loss_memory"]
    assert [row["variant"] for row in b["rows"]] == ["naive_log_softmax_kl", "kd_loss", "kd_loss_chunk64"]
    for row in b["rows"]:
        for key in ["extra_peak_mb", "mem_vs_naive", "time_s", "time_vs_naive", "loss", "loss_abs_diff_vs_naive"]:
            assert _finite(row[key]), (row["variant"], key, row[key])
        assert row["extra_peak_mb"] > 0 and row["time_s"] > 0
        assert row["loss_abs_diff_vs_naive"] < 1e-2 * abs(b["rows"][0]["loss"])  # same KL, chunked or not

    c = report["generation"]
    assert not c["backend_import"].startswith("failed"), c["backend_import"]
    assert [row["path"] for row in c["rows"]] == ["raw_generate", "backend_generate"]
    for row in c["rows"]:
        for key in ["seconds", "tokens_per_s", "vs_raw"]:
            assert _finite(row[key]) and row[key] > 0, (row["path"], key, row[key])
        assert row["new_tokens"] == c["batch"] * c["new_tokens"]  # no EOS: every row runs to full length
    assert _finite(c["backend_same_tokens_fraction"])

    d = report["fused_losses"]
    names = ["naive", "logits_path", "fused", "fused_gpu_tiles", "trl_chunked", "liger_fused_jsd"]
    assert [row["variant"] for row in d["rows"]] == names
    measured = {row["variant"]: row for row in d["rows"] if "skipped" not in row}
    assert {"naive", "logits_path", "fused", "fused_gpu_tiles"} <= set(measured)
    for row in measured.values():
        for key in ["extra_peak_mb", "input_grads_mb", "mem_vs_input_grads", "time_s", "loss"]:
            assert _finite(row[key]) and row[key] > 0, (row["variant"], key, row[key])
        assert abs(row["loss"] - measured["naive"]["loss"]) < 2e-2 * measured["naive"]["loss"]  # one JSD, bf16 inputs
    if "trl_chunked" in measured:
        assert measured["trl_chunked"]["time_vs_trl"] == 1.0 and _finite(measured["fused"]["mem_vs_trl"])


@pytest.mark.slow
def test_dry_run_without_trl_or_datasets(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_MAIN, "--dry-run", "--json", str(out)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    check_report(report, cuda=False)
    # on a stock image the backend's package __init__ (pyarrow, datasets) is skipped, and the check says so
    assert report["generation"]["backend_import"].startswith("by path, skipping __init__ of align_distill.data_gen")
    assert report["distill_step"]["losses_import"] == "package import"
    for header in ["(a) distill step", "(b) loss forward+backward", "(c) generation", "MFU = 6 * N_student",
                   "(d) fused losses"]:
        assert header in done.stdout
    # no trl on a stock image: its row says so instead of failing the section
    assert report["fused_losses"]["rows"][4] == {"variant": "trl_chunked", "skipped": "trl is not installed"}
    assert "FAILED" not in done.stdout


def test_import_isolated_skips_a_failing_package_init():
    """A package whose `__init__` needs a missing dependency is bypassed; modules that need only torch load.
    (In a subprocess: the stub package it registers must not leak into other tests.)"""
    code = (
        "import sys\n"
        f"for name in {ABSENT_ON_GPU_IMAGE!r}:\n"
        "    sys.modules[name] = None\n"
        "from bench.gpu_check import import_isolated\n"
        "module, how = import_isolated('align_distill.data_gen.backends.transformers_backend')\n"
        "losses, losses_how = import_isolated('align_distill.losses')\n"
        "print(hasattr(module, 'TransformersGenerator'), callable(losses.kd_loss), losses_how)\n"
        "print(how)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    first, how = done.stdout.strip().splitlines()[-2:]
    assert first == "True True package import"
    assert how.startswith("by path, skipping __init__ of align_distill.data_gen, ")
    assert "align_distill.data," in how and "(ModuleNotFoundError" in how


def test_peak_table_and_tiny_sizes(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)  # by path: `bench` is not an installed package
    FULL, TINY, peak_tflops = gpu_check.FULL, gpu_check.TINY, gpu_check.peak_tflops

    assert peak_tflops(torch.device("cpu"), 989.0) == (989.0, "--peak-tflops")
    assert TINY.student.hidden == 64 and TINY.student.layers == 2 and TINY.student.vocab == 1024 and TINY.seq == 64
    assert (FULL.student.hidden, FULL.student.layers, FULL.teacher.hidden, FULL.teacher.layers) == (896, 24, 1536, 28)
    assert FULL.loss_vocab == 152064 and FULL.loss_seq == 4096 and FULL.gen_batch == 32 and FULL.gen_new == 128


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (H100/H200-class, ~40 GB free) for the real sizes; test_dry_run_without_trl_or_datasets "
    "runs the same code paths on CPU",
)
def test_real_sizes_on_gpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--json", str(out)],
        cwd=REPO,
        env={**_env(), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=540,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_report(json.loads(out.read_text()), cuda=True)
