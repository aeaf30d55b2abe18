"""The recipes shipped inside the package (`align_distill/configs/<method>/<name>.yaml`), found by name.

A recipe is named by its folder and file stem: `dckd/cache` is `align_distill/configs/dckd/cache.yaml`. The launcher
files (`accelerate/*.yaml` for `accelerate launch --config_file`, `deepspeed/*.json` for `--deepspeed`) are not
recipes; they are listed apart and named with their extension: `accelerate/zero3.yaml`, `deepspeed/zero3.json`.
Files are reached through `importlib.resources`, so everything here works the same from a source checkout, an
editable install and an installed wheel.

    align-distill recipes list              every recipe and launcher file, with a one-line description
    align-distill recipes show NAME         print the file
    align-distill recipes copy NAME [DIR]   write DIR/<method>_<name>.yaml (flat, ready to edit; DIR: the cwd)

`--config` takes a file path or a recipe name (`resolve_config`); `check_requirements` turns the bare
FileNotFoundError of a recipe that reads the quickstart's outputs (`runs/quickstart/...`) into a message that says
to run `align-distill quickstart` first.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import difflib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from align_distill.errors import ConfigError

RECIPES_PACKAGE = "align_distill.configs"
LAUNCHER_DIRS = ("accelerate", "deepspeed")  # listed with their extension, apart from the recipes
QUICKSTART_DIR = "runs/quickstart"  # `align-distill quickstart`'s default run_dir
_SUFFIXES = (".yaml", ".json")
_OUTPUT_KEYS = frozenset({"output_dir", "run_dir", "logging_dir"})  # written by the run, never required before it
_HINT = "`align-distill recipes list` shows them"

_extracted = contextlib.ExitStack()  # files extracted from a zipped install live until the interpreter exits
atexit.register(_extracted.close)


# -- finding the files ----------------------------------------------------------------------------------------------
def _root() -> Any:
    """The `configs` folder as an importlib.resources Traversable (`align_distill.configs` has no __init__.py)."""
    package, _, folder = RECIPES_PACKAGE.rpartition(".")
    return resources.files(package).joinpath(folder)


def _entries() -> dict[str, Any]:
    """name -> Traversable for every shipped file: `dckd/cache` for recipes, `deepspeed/zero3.json` for launchers."""
    found: dict[str, Any] = {}
    root = _root()
    if not root.is_dir():
        return found
    for folder in root.iterdir():
        if not folder.is_dir() or folder.name.startswith(("_", ".")):
            continue
        for item in folder.iterdir():
            suffix = PurePosixPath(item.name).suffix
            if not item.is_file() or suffix not in _SUFFIXES:
                continue
            if folder.name in LAUNCHER_DIRS:
                found[f"{folder.name}/{item.name}"] = item
            elif suffix == ".yaml":
                found[f"{folder.name}/{PurePosixPath(item.name).stem}"] = item
    return dict(sorted(found.items()))


def list_recipes() -> list[str]:
    """The YAML recipes' names, sorted: `adpa/cache`, ..., `dckd/cache`, ... (launcher files excluded)."""
    return [name for name in _entries() if name.split("/", 1)[0] not in LAUNCHER_DIRS]


def list_launcher_configs() -> list[str]:
    """The launcher files' names, sorted, with their extension: `accelerate/zero3.yaml`, `deepspeed/zero3.json`."""
    return [name for name in _entries() if name.split("/", 1)[0] in LAUNCHER_DIRS]


def _canonical(name: str, entries: dict[str, Any]) -> str | None:
    """`dckd/cache`, `dckd/cache.yaml` -> `dckd/cache`; `accelerate/zero3` -> `accelerate/zero3.yaml`; else None."""
    name = name.strip().replace("\\", "/").strip("/")
    if name in entries:
        return name
    stem, suffix = os.path.splitext(name)
    if suffix == ".yaml" and stem in entries:
        return stem
    if not suffix:  # a launcher file named without its extension, when that is unambiguous
        matches = [f"{name}{s}" for s in _SUFFIXES if f"{name}{s}" in entries]
        if len(matches) == 1:
            return matches[0]
    return None


def _suggest(name: str, names: list[str]) -> str:
    stem = os.path.splitext(name.strip().replace("\\", "/").strip("/"))[0]
    close = difflib.get_close_matches(stem, [os.path.splitext(n)[0] for n in names], n=3, cutoff=0.6)
    close = [next(n for n in names if os.path.splitext(n)[0] == c) for c in close]
    return f" (did you mean {', '.join(f'`{c}`' for c in close)}?)" if close else ""


def _as_path(item: Any) -> Path:
    if isinstance(item, Path):
        return item
    return _extracted.enter_context(resources.as_file(item))  # e.g. a zipped install: a real file for the caller


def recipe_path(name: str) -> Path:
    """The file of a shipped recipe or launcher config, by name (`dckd/cache`, `dckd/cache.yaml`,
    `deepspeed/zero3.json`); ConfigError naming the closest names when there is none."""
    entries = _entries()
    canonical = _canonical(name, entries)
    if canonical is None:
        raise ConfigError(f"unknown recipe `{name}`{_suggest(name, list(entries))}; {_HINT}")
    return _as_path(entries[canonical])


def recipe_name(path: str | os.PathLike[str]) -> str | None:
    """The recipe name of a file inside the shipped configs folder (`.../configs/dckd/cache.yaml` -> `dckd/cache`)."""
    path = Path(path)
    if len(path.parts) < 2:
        return None
    entries = _entries()
    canonical = _canonical(f"{path.parent.name}/{path.name}", entries)
    if canonical is None:
        return None
    with contextlib.suppress(OSError):
        if _as_path(entries[canonical]).resolve() == path.resolve():
            return canonical
    return None


def describe(name: str) -> str:
    """One line about a recipe: the first clause of its header's first comment line that is not a command line
    (a DeepSpeed JSON, which has no comments: its ZeRO stage and offload)."""
    path = recipe_path(name)
    if path.suffix == ".json":
        return _describe_deepspeed(path)
    return _description(path.read_text(encoding="utf-8").splitlines())


def _describe_deepspeed(path: Path) -> str:
    try:
        zero = json.loads(path.read_text(encoding="utf-8")).get("zero_optimization") or {}
    except (ValueError, AttributeError):
        return ""
    if "stage" not in zero:
        return "DeepSpeed config"
    offload = [what for what in ("optimizer", "param") if (zero.get(f"offload_{what}") or {}).get("device") == "cpu"]
    names = {"optimizer": "optimizer states", "param": "parameters"}
    suffix = f", {' and '.join(names[w] for w in offload)} offloaded to CPU" if offload else ""
    return f"DeepSpeed ZeRO-{zero['stage']}{suffix}"


def _description(lines: list[str], limit: int = 90) -> str:
    comments = []
    for line in lines:
        stripped = line.strip()
        if not stripped.startswith("#"):
            break  # the header ends at the first key
        comments.append(stripped.lstrip("#").strip())
    commands = ("align-distill ", "accelerate ", "deepspeed ", "torchrun ", "python ", "vllm ", "Run:")
    text = next((c for c in comments if c and not c.startswith(commands)), None)
    if text is None:  # only a command line: `align-distill train dpo --config ...` -> `align-distill train dpo`
        text = next((c for c in comments if c), "").split(" --config", 1)[0]
    text = text.split("  ", 1)[0]  # a trailing `:  align-distill pipeline ...`
    cut = next((m.start() for m in re.finditer(r"(?<!e\.g)(?<!i\.e)\. |: |; ", text) if m.start() >= 20), None)
    text = text[:cut] if cut is not None else text
    text = text.strip().rstrip(":,;.").strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# -- --config -------------------------------------------------------------------------------------------------------
def resolve_config(value: str | os.PathLike[str]) -> Path:
    """What `--config VALUE` means: an existing file wins; else a recipe name (`dckd/cache` or `dckd/cache.yaml`);
    else a path into the package's configs folder as the docs write it (`align_distill/configs/dckd/cache.yaml`),
    which then names the shipped file wherever the package is installed. ConfigError otherwise."""
    text = os.fspath(value)
    given = Path(text).expanduser()
    if given.is_file():
        return given
    entries = _entries()
    parts = text.replace("\\", "/").split("/")
    candidates = [text]
    for i in range(len(parts) - 1):  # `[...]/align_distill/configs/dckd/cache.yaml`
        if parts[i : i + 2] == RECIPES_PACKAGE.split(".") and len(parts) == i + 4:
            candidates.append("/".join(parts[i + 2 :]))
    for candidate in candidates:
        canonical = _canonical(candidate, entries)
        if canonical is not None:
            return _as_path(entries[canonical])
    hint = _suggest(candidates[-1], list(entries))
    if given.exists():
        raise ConfigError(f"`{text}` is a folder, not a config file, and not a recipe name{hint}; {_HINT}")
    raise ConfigError(f"`{text}`: no such file, and not a recipe name{hint}; {_HINT}")


def _strings(value: Any, key: str | None = None) -> Iterator[str]:
    """Every string (or path) value in nested mappings / sequences, except those under an output key."""
    if key in _OUTPUT_KEYS:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, str(k))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v, key)
    elif isinstance(value, (str, os.PathLike)):
        yield os.fspath(value)


def _normal(path: str) -> str:
    return os.path.normpath(path).replace("\\", "/")


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_requirements(path: str | os.PathLike[str], values: dict, quickstart_dir: str = QUICKSTART_DIR) -> None:
    """Raise ConfigError when the config at `path` reads the quickstart's outputs and they are not there.

    Generic: every string value (nested mappings and lists included) under `quickstart_dir` (relative paths: from
    the current directory, like the config's other paths) must exist. Output keys (output_dir, run_dir) are
    skipped, and so is everything under the config's own run_dir / output_dir: a pipeline that writes into the
    quickstart folder makes those files itself."""
    path = Path(path)
    quickstart = _normal(os.fspath(quickstart_dir))
    own = [_normal(os.fspath(values[k])) for k in ("run_dir", "output_dir") if isinstance(values.get(k), (str, Path))]
    missing: list[str] = []
    for text in _strings(values):
        if not text or "${" in text or "\n" in text:
            continue
        normal = _normal(text)
        if not _under(normal, quickstart) or any(_under(normal, o) for o in own):
            continue
        if not Path(text).expanduser().exists() and text not in missing:
            missing.append(text)
    if missing:
        label = recipe_name(path)
        label = f"{label}.yaml" if label and not label.endswith(_SUFFIXES) else (label or path.name)
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConfigError(
            f"`{label}` needs the quickstart's outputs (`{missing[0]}`{more} is missing): "
            "run `align-distill quickstart` first"
        )


# -- align-distill recipes ------------------------------------------------------------------------------------------
def _list(out) -> None:
    recipes, launchers = list_recipes(), list_launcher_configs()
    width = max(map(len, recipes + launchers), default=0) + 2
    print("Recipes (align-distill train METHOD | generate JOB | pipeline, with --config NAME):", file=out)
    for name in recipes:
        print(f"  {name:<{width}}{describe(name)}".rstrip(), file=out)
    if launchers:
        print("\nLauncher configs (scripts/train.sh; accelerate launch --config_file, --deepspeed):", file=out)
        for name in launchers:
            print(f"  {name:<{width}}{describe(name)}".rstrip(), file=out)
    root = _root()
    if isinstance(root, Path):
        print(f"\nfiles: {root}", file=out)


def _copy(name: str, folder: Path, force: bool) -> Path:
    source = recipe_path(name)
    canonical = _canonical(name, _entries())
    assert canonical is not None  # recipe_path raised otherwise
    method, stem = canonical.split("/", 1)
    # recipes: dckd_cache.yaml; launcher files keep their own extension: deepspeed_zero3.json
    target = folder / (f"{method}_{stem}" if stem.endswith(_SUFFIXES) else f"{method}_{stem}.yaml")
    if target.exists() and not force:
        raise ConfigError(f"`{target}` exists; pass --force to overwrite it")
    folder.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    """`align-distill recipes list | show NAME | copy NAME [DIR] [--force]`; returns the exit code.

    `copy` writes one flat file, `DIR/<method>_<name>.yaml` (`dckd/cache` -> `dckd_cache.yaml`; launcher files keep
    their extension: `deepspeed/zero3.json` -> `deepspeed_zero3.json`), creating DIR, never overwriting an existing
    file without --force, and writing through a temporary name renamed into place (no half-written file). A user
    error (unknown name, existing target) is one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(
        prog="align-distill recipes", description="The recipes shipped with align-distill (align_distill/configs)."
    )
    commands = parser.add_subparsers(dest="command", metavar="{list,show,copy}")
    commands.required = True
    commands.add_parser("list", help="every recipe and launcher config, with a one-line description")
    show = commands.add_parser("show", help="print a recipe")
    show.add_argument("name", help="a recipe name, e.g. dckd/cache")
    copy = commands.add_parser("copy", help="copy a recipe to DIR/<method>_<name>.yaml, to edit")
    copy.add_argument("name", help="a recipe name, e.g. dckd/cache")
    copy.add_argument("dir", nargs="?", default=".", help="destination folder (created; default: the current one)")
    copy.add_argument("--force", action="store_true", help="overwrite an existing file")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        if args.command == "list":
            _list(sys.stdout)
        elif args.command == "show":
            text = recipe_path(args.name).read_text(encoding="utf-8")
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
        else:
            print(_copy(args.name, Path(args.dir).expanduser(), args.force))
    except (ConfigError, OSError) as error:
        message = str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}"
        print(f"align-distill recipes: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
