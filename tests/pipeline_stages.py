"""Tiny `call` stages for pipeline tests: they count their runs in a log file beside the run folder."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist


def _log(out_dir: Path, name: str) -> None:
    with open(out_dir.parent.parent / "calls.log", "a") as handle:
        handle.write(name + "\n")


def write_number(out_dir: Path, value: int = 1, name: str = "a", note: str | None = None) -> int:
    _log(out_dir, name)
    (out_dir / "value.txt").write_text(str(value))
    return value


def add_from(out_dir: Path, source: str, plus: int = 1, name: str = "b") -> int:
    _log(out_dir, name)
    value = int((Path(source) / "value.txt").read_text()) + plus
    (out_dir / "value.txt").write_text(str(value))
    return value


def explode(out_dir: Path, name: str = "boom") -> None:
    _log(out_dir, name)
    (out_dir / "half-written.txt").write_text("partial")
    raise RuntimeError("stage failed on purpose")


def keep(out_dir: Path, name: str = "k", **settings) -> dict:
    """Accepts any keys (a stage config holding secrets, for the record test)."""
    _log(out_dir, name)
    return {"keys": sorted(settings)}


def world(out_dir: Path, name: str = "w") -> int:
    """Writes the process group's size (1 when none) and the rank that ran it."""
    _log(out_dir, name)
    size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    (out_dir / "world.txt").write_text(f"{size} {rank}")
    return size
