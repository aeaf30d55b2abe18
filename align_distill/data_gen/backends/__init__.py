"""Generation backends behind one `Generator` interface, made by name so that a job's YAML picks one with a key.

Backends are imported lazily: choosing "transformers" never imports vLLM, and a missing optional package is
reported with the install command.
"""

from __future__ import annotations

import importlib
import inspect
import socket
from dataclasses import replace
from typing import Any
from urllib.parse import urlparse

from .base import Completion, Generator, Prompt, SamplingParams, TokenScores

BACKENDS: dict[str, tuple[str, str, str]] = {
    # name: (module, class, what to install if the import fails)
    "transformers": ("align_distill.data_gen.backends.transformers_backend", "TransformersGenerator", "transformers"),
    "vllm": ("align_distill.data_gen.backends.vllm_backend", "VLLMGenerator", "align-distill[vllm]"),
    "openai": ("align_distill.data_gen.backends.openai_backend", "OpenAIGenerator", "httpx"),
}


def backend_class(backend: str) -> type[Generator]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    module_name, class_name, package = BACKENDS[backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"backend {backend!r} could not be imported ({error}); install {package}") from error
    return getattr(module, class_name)


def make_generator(backend: str, model: str, tokenizer: str | None = None, **backend_kwargs: Any) -> Generator:
    """A `Generator` for `model` with the named backend ("transformers", "vllm" or "openai"). `backend_kwargs`
    go to the backend's constructor (e.g. dtype, device, batch_size; tensor_parallel_size; base_url, api_key)."""
    cls = backend_class(backend)
    if backend == "openai":
        check_reachable(str(backend_kwargs.get("base_url", "")))
    try:
        inspect.signature(cls).bind(model=model, tokenizer=tokenizer, **backend_kwargs)
    except TypeError as error:
        raise TypeError(f"backend {backend!r} ({cls.__name__}) does not take these arguments: {error}") from None
    return cls(model=model, tokenizer=tokenizer, **backend_kwargs)


def check_reachable(base_url: str, timeout: float = 3.0) -> None:
    """Fail fast, with the address, when nothing listens at an OpenAI-compatible server's URL (instead of minutes
    of retries inside the first request)."""
    parsed = urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"backend 'openai' needs backend_kwargs.base_url like http://host:8000/v1, got {base_url!r}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise ConnectionError(
            f"cannot reach the OpenAI-compatible server at {base_url} ({error}); start it (e.g. `vllm serve "
            "MODEL`) or fix backend_kwargs.base_url"
        ) from None


def accepts_seeds(generator: Generator) -> bool:
    return "seeds" in inspect.signature(generator.generate).parameters


def generate_with_seeds(
    generator: Generator, prompts: list[Prompt], params: SamplingParams, seeds: list[int]
) -> list[list[Completion]]:
    """Generate with one seed per prompt, so a prompt's samples do not depend on its batch (resumable jobs).

    Backends whose `generate` takes `seeds=` get one batched call; others get one call per prompt with
    `params.seed` set to that prompt's seed (correct, slower). Greedy decoding needs no seeds: one call.
    """
    if params.greedy:
        return generator.generate(prompts, params)
    if accepts_seeds(generator):
        return generator.generate(prompts, params, seeds=seeds)  # type: ignore[call-arg]
    return [generator.generate([prompt], replace(params, seed=seed))[0] for prompt, seed in zip(prompts, seeds)]


__all__ = [
    "BACKENDS",
    "Completion",
    "Generator",
    "Prompt",
    "SamplingParams",
    "TokenScores",
    "accepts_seeds",
    "backend_class",
    "check_reachable",
    "generate_with_seeds",
    "make_generator",
]
