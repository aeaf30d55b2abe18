"""The one hashing policy of align-distill: files, folders, models, tokenizers and settings.

Used by data_gen stores (what a job's output depends on), pipeline stages (when to rerun) and the model card's
provenance (which exact files a model came from), so that one file gets one digest everywhere.

A store remembers its job's fingerprint; a rerun with another one is refused (or, with overwrite, starts over),
so a resumed store never mixes rows from two different models or settings.

Model identity: for a local folder, sha256 of its config, generation config and weight-index files, and of each
weight file (whole file up to `FULL_HASH_LIMIT`, beyond that its size plus its first and last MiB — enough to tell
retrained weights apart without reading 100 GB). For a hub id: the id and the revision asked for (no network).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FULL_HASH_LIMIT = 256 * 2**20
EDGE = 2**20
MODEL_FILES = ("config.json", "generation_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
NON_SEMANTIC_KWARGS = frozenset(
    {
        "batch_size",
        "max_batch_tokens",
        "device",
        "base_url",
        "api_key",
        "api_key_env",
        "timeout",
        "max_concurrency",
        "concurrency",
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "max_num_seqs",
        "enforce_eager",
    }
)
"""Backend arguments that change speed or placement but not (intentionally) the output; left out of fingerprints so
a part can be resumed on other hardware."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path, full_limit: int = FULL_HASH_LIMIT) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= full_limit:
            for block in iter(lambda: handle.read(2**22), b""):
                digest.update(block)
        else:
            digest.update(f"size={size};".encode())
            digest.update(handle.read(EDGE))
            handle.seek(size - EDGE)
            digest.update(handle.read(EDGE))
    return digest.hexdigest()


def model_fingerprint(model: str, revision: str | None = None) -> dict[str, Any]:
    path = Path(model).expanduser()
    if not path.is_dir():
        return {"name": model, "revision": revision, "local": False}
    files = {
        f.name: file_digest(f)
        for f in sorted(path.iterdir())
        if f.is_file()
        and (f.name in MODEL_FILES or f.name.endswith(".index.json") or f.name.endswith(WEIGHT_SUFFIXES))
    }
    return {"name": str(path.resolve()), "revision": revision, "local": True, "files": files}


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's behaviour (serialized fast tokenizer, or vocabulary), special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = backend.to_str()
    else:
        content = repr(sorted(tokenizer.get_vocab().items()))
    return {
        "sha256": sha256_bytes(content.encode()),
        "size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "bos_token": getattr(tokenizer, "bos_token", None),
        "chat_template": tokenizer.chat_template,
    }


def semantic_kwargs(backend_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sorted(backend_kwargs.items()) if k not in NON_SEMANTIC_KWARGS}


def config_digest(value: Any) -> str:
    """sha256 of a JSON-able value (keys sorted; anything else by its str)."""
    return sha256_bytes(json.dumps(value, sort_keys=True, default=str).encode())


def path_digest(path: Path) -> str:
    """Content digest of a file or a folder (sorted walk of relative names + `file_digest` of each file)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        digest.update(file_digest(file).encode())
    return digest.hexdigest()


def model_digest(path: Path) -> str:
    """One digest of a model or adapter folder (its config and weight files, as `model_fingerprint` reads them), or
    `path_digest` of anything else."""
    if path.is_dir() and ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
        files = model_fingerprint(str(path))["files"]
        if (path / "adapter_config.json").exists():
            files = {**files, **{f.name: file_digest(f) for f in sorted(path.glob("adapter_*")) if f.is_file()}}
        return config_digest(files)
    return path_digest(path)
