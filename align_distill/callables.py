"""Python functions named in a recipe: `package.module:function`, or `path/to/file.py:function` for code that is
not installed (an example's task checker). Pipeline `call` stages, judge functions and reward functions all name
their function this way."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def load_module(name_or_path: str) -> Any:
    """An importable module, or a `.py` file loaded once under a name derived from its resolved path."""
    if not name_or_path.endswith(".py"):
        return importlib.import_module(name_or_path)
    path = Path(name_or_path).expanduser().resolve()
    if not path.is_file():
        raise ImportError(f"no such file {name_or_path} (relative paths are resolved from {Path.cwd()})")
    name = f"_align_distill_file_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def load_callable(spec: str, what: str = "function") -> Callable[..., Any]:
    """The function `spec` names (`module:function` or `file.py:function`); a ValueError says what is wrong."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise ValueError(f"expected 'module:function' or 'file.py:function' for the {what}, got {spec!r}")
    try:
        module = load_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name!r} of the {what} {spec!r}: {error}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{module_name!r} has no function {name!r} (the {what} {spec!r})")
    return function
