"""Multi-stage recipes: each stage writes `<run_dir>/<stage>/`, is fingerprinted, and is skipped when done.

A recipe is a list of named stages run in order:

    run_dir: runs/teacher
    stages:
      - name: teacher_sft
        train: sft                     # or `generate: <job>`, or `call: module:function`
        config: {model_name_or_path: models/teacher, dataset_path: data/sft.jsonl, max_steps: 200}
      - name: teacher_dpo
        train: dpo
        config: {model_name_or_path: "${teacher_sft}", dataset_path: data/pairs.jsonl}

`${stage}` in a config value is that stage's output folder (and makes this stage depend on it); `${run_dir}` is
the run folder. A stage's fingerprint hashes its kind, its config, the fingerprints of the stages it references
and the content of the local files it names, so changing any input reruns exactly the stages downstream of it.

A stage runs in `<run_dir>/.<stage>.partial/` and is renamed to `<stage>/` with a `stage.json` marker only when it
finished: an interrupted stage never looks complete and is redone from a clean folder (a `generate` stage keeps its
partial folder, because the store itself resumes exactly once).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

MARKER = "stage.json"
_REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
_HASH_CONTENT_LIMIT = 256 * 1024 * 1024  # larger files are fingerprinted by size and mtime


class PipelineError(ValueError):
    """A recipe problem, naming the stage (and key) at fault."""


@dataclass
class Stage:
    name: str
    kind: str  # "train" | "generate" | "call"
    target: str  # method name, job name, or "module:function"
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], index: int) -> Stage:
        if not isinstance(raw, dict) or "name" not in raw:
            raise PipelineError(f"stage #{index + 1}: expected a mapping with a `name`, found {raw!r}")
        kinds = [k for k in ("train", "generate", "call") if k in raw]
        if len(kinds) != 1:
            raise PipelineError(f"stage {raw['name']!r}: give exactly one of `train`, `generate`, `call`")
        unknown = set(raw) - {"name", "config", *kinds}
        if unknown:
            raise PipelineError(f"stage {raw['name']!r}: unknown keys {sorted(unknown)}")
        config = raw.get("config") or {}
        if not isinstance(config, dict):
            raise PipelineError(f"stage {raw['name']!r}: `config` must be a mapping")
        return cls(name=str(raw["name"]), kind=kinds[0], target=str(raw[kinds[0]]), config=dict(config))


def _walk_strings(value: Any, fn: Callable[[str], Any]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_walk_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _walk_strings(v, fn) for k, v in value.items()}
    return value


def references(stage: Stage) -> list[str]:
    found: list[str] = []
    _walk_strings(stage.config, lambda s: found.extend(_REFERENCE.findall(s)) or s)
    return [name for name in dict.fromkeys(found) if name != "run_dir"]


def file_fingerprint(path: Path) -> str:
    """Content hash of a file or folder (sorted walk); very large files by size and mtime."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        stat = file.stat()
        if stat.st_size > _HASH_CONTENT_LIMIT:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            continue
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class Pipeline:
    """Stages run in order under one run folder; see the module docstring."""

    def __init__(self, run_dir: str | os.PathLike, stages: list[Stage]):
        self.run_dir = Path(run_dir)
        self.stages = stages
        names = [s.name for s in stages]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise PipelineError(f"duplicate stage names: {sorted(duplicates)}")
        for position, stage in enumerate(stages):
            for ref in references(stage):
                if ref not in names[:position]:
                    where = "a later stage" if ref in names else "not a stage"
                    raise PipelineError(f"stage {stage.name!r} references ${{{ref}}}, which is {where}")
        self._fingerprints: dict[str, str] = {}

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], run_dir: str | os.PathLike | None = None) -> Pipeline:
        if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list):
            raise PipelineError("a pipeline recipe needs a `stages:` list")
        run_dir = run_dir or recipe.get("run_dir")
        if not run_dir:
            raise PipelineError("set `run_dir` in the recipe or pass --run-dir")
        return cls(run_dir, [Stage.from_dict(raw, i) for i, raw in enumerate(recipe["stages"])])

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def resolve(self, stage: Stage) -> dict[str, Any]:
        def substitute(text: str) -> Any:
            def one(match: re.Match) -> str:
                ref = match.group(1)
                return str(self.run_dir if ref == "run_dir" else self.stage_dir(ref))

            return _REFERENCE.sub(one, text)

        return _walk_strings(stage.config, substitute)

    def fingerprint(self, stage: Stage) -> str:
        resolved = self.resolve(stage)
        inputs: dict[str, str] = {}

        def note_file(text: str) -> str:
            path = Path(text)
            # the run folder itself (`${run_dir}`) counts as inside: hashing it would hash every stage's output
            inside_run = path.resolve() == self.run_dir.resolve() or self.run_dir.resolve() in path.resolve().parents
            if len(text) < 4096 and not inside_run and path.exists():
                inputs[text] = file_fingerprint(path)
            return text

        _walk_strings(resolved, note_file)
        payload = {
            "kind": stage.kind,
            "target": stage.target,
            "config": stage.config,
            "upstream": {ref: self._fingerprints[ref] for ref in references(stage)},
            "files": inputs,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def is_complete(self, stage: Stage, fingerprint: str) -> bool:
        marker = self.stage_dir(stage.name) / MARKER
        if not marker.exists():
            return False
        return json.loads(marker.read_text()).get("fingerprint") == fingerprint

    def run(self, from_stage: str | None = None, only: list[str] | None = None) -> dict[str, Path]:
        names = [s.name for s in self.stages]
        for name in [from_stage, *(only or [])]:
            if name is not None and name not in names:
                raise PipelineError(f"unknown stage {name!r}; stages are {names}")
        forced = set(names[names.index(from_stage) :]) if from_stage else set()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.validate_inputs()
        outputs: dict[str, Path] = {}
        for position, stage in enumerate(self.stages, start=1):
            fingerprint = self.fingerprint(stage)
            self._fingerprints[stage.name] = fingerprint
            outputs[stage.name] = self.stage_dir(stage.name)
            label = f"[{position}/{len(self.stages)}] {stage.name}"
            if only is not None and stage.name not in only:
                if not self.is_complete(stage, fingerprint):
                    raise PipelineError(f"{label}: not complete, but a stage in --only needs it; run it first")
                continue
            if stage.name not in forced and self.is_complete(stage, fingerprint):
                print(f"{label}: done (fingerprint {fingerprint[:10]}), skipped", flush=True)
                continue
            print(f"{label}: running {stage.kind} {stage.target}", flush=True)
            started = time.time()
            self._run_stage(stage, fingerprint)
            print(f"{label}: finished in {time.time() - started:.0f}s", flush=True)
        return outputs

    def validate_inputs(self) -> None:
        """Check every training dataset that already exists before the first model is loaded."""
        from align_distill.data import DataValidationError, load_rows, validate
        from align_distill.methods import METHODS, method_module

        problems = []
        for stage in self.stages:
            if stage.kind != "train" or stage.target not in METHODS:
                continue
            path = stage.config.get("dataset_path")
            if not isinstance(path, str) or _REFERENCE.search(path):
                continue  # produced by an earlier stage: validated when that stage's output is trained on
            module = method_module(stage.target)
            fmt = getattr(module, "DATA_FORMAT", None) or getattr(module, "STAGE_FORMATS", {}).get(
                stage.config.get("stage")
            )
            if fmt is None:
                continue
            try:
                problems.extend(validate(load_rows(path), fmt, source=path).problems)
            except DataValidationError as error:
                problems.extend(error.problems)
        if problems:
            raise DataValidationError(problems)

    def _run_stage(self, stage: Stage, fingerprint: str) -> None:
        final = self.stage_dir(stage.name)
        partial = self.run_dir / f".{stage.name}.partial"
        if partial.exists() and stage.kind != "generate":
            shutil.rmtree(partial)
        if final.exists():
            shutil.rmtree(final)
        partial.mkdir(parents=True, exist_ok=True)
        config = self.resolve(stage)
        result = RUNNERS[stage.kind](stage, config, partial)
        record = {
            "stage": stage.name,
            "kind": stage.kind,
            "target": stage.target,
            "fingerprint": fingerprint,
            "config": config,
            "result": result if isinstance(result, (dict, list, str, int, float)) else None,
        }
        tmp = partial / f".{MARKER}.tmp"
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, partial / MARKER)
        os.replace(partial, final)


def _run_train(stage: Stage, config: dict[str, Any], out: Path) -> Any:
    from transformers import HfArgumentParser

    from align_distill.methods import method_module

    module = method_module(stage.target)
    config = {**config, "output_dir": str(out)}
    try:
        parsed = HfArgumentParser(module.DATACLASSES).parse_dict(config, allow_extra_keys=False)
    except ValueError as error:
        raise PipelineError(f"stage {stage.name!r} ({stage.target}): {error}") from error
    from align_distill.hub import train_and_publish

    return train_and_publish(stage.target, module, parsed)


def _run_generate(stage: Stage, config: dict[str, Any], out: Path) -> Any:
    from align_distill.data_gen import run_job

    return str(run_job(stage.target, {**config, "output_dir": str(out)}))


def _run_call(stage: Stage, config: dict[str, Any], out: Path) -> Any:
    module_name, _, function_name = stage.target.partition(":")
    if not function_name:
        raise PipelineError(f"stage {stage.name!r}: `call` must be 'module:function', found {stage.target!r}")
    function = getattr(importlib.import_module(module_name), function_name)
    return function(out, **config)


RUNNERS: dict[str, Callable[[Stage, dict[str, Any], Path], Any]] = {
    "train": _run_train,
    "generate": _run_generate,
    "call": _run_call,
}


def run_pipeline_file(
    path: str | os.PathLike, run_dir: str | None = None, from_stage: str | None = None, only: list[str] | None = None
) -> dict[str, Path]:
    with open(path) as handle:
        recipe = yaml.safe_load(handle)
    return Pipeline.from_recipe(recipe, run_dir=run_dir).run(from_stage=from_stage, only=only)
