"""Tiny `call` stages for pipeline tests: they count their runs in a log file beside the run folder."""

from __future__ import annotations

from pathlib import Path


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
