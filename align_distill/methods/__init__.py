"""One module per `align-distill train <method>`, TRL-style: dataclasses for the parser and `main(...)`.

Each module exposes `DATACLASSES` (the types `TrlParser` fills from YAML + CLI flags, in the order `main` takes
them), `main(*parsed)` and a one-line `HELP`. The registry maps method names to modules so that importing the CLI
stays cheap: a method's heavy imports happen only when it runs.
"""

from __future__ import annotations

import importlib
from types import ModuleType

METHODS: dict[str, str] = {
    "sft": "align_distill.methods.sft",
    "dpo": "align_distill.methods.dpo",
    "mod": "align_distill.methods.mod",
    "cyclealign": "align_distill.methods.cyclealign",
    "aligndistil": "align_distill.methods.aligndistil",
    "dckd": "align_distill.methods.dckd",
    "adpa": "align_distill.methods.adpa",
    "kd": "align_distill.methods.kd",
}


def method_module(name: str) -> ModuleType:
    """The module implementing `name`; the error lists what exists."""
    if name not in METHODS:
        raise SystemExit(f"align-distill train: unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return importlib.import_module(METHODS[name])
