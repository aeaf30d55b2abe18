"""Multi-stage recipes: each stage writes `<run_dir>/<stage>/`, is fingerprinted, and is skipped when done.

A recipe is a list of named stages run in order:

    run_dir: runs/teacher
    stages:
      - name: teacher_sft
        train: sft                     # or `generate: <job>`, `call: module:function`, `evaluate: inline`
        config: {model_name_or_path: models/teacher, dataset_name: data/sft.jsonl, max_steps: 200}
      - name: teacher_dpo
        train: dpo
        config: {model_name_or_path: "${teacher_sft}", dataset_name: data/pairs.jsonl}

`${stage}` in a config value is that stage's output folder (and makes this stage depend on it); `${run_dir}` is
the run folder. An `evaluate` stage runs `align-distill evaluate` (`align_distill.evaluation`): its value is a YAML
file or recipe name whose keys `config` overrides, or `inline` (every key in `config`). A stage's fingerprint hashes
its kind, its config, the fingerprints of the stages it references and the content of the local files it names, so
changing any input reruns exactly the stages downstream of it.

Stage names are plain folder names. A stage runs in `<run_dir>/.<stage>.partial/` and is renamed to `<stage>/` with
a `stage.json` marker (secrets redacted, with the fingerprint's inputs so that a rerun says why it runs) only when it
finished: an interrupted stage never looks complete. On the next run a `train` stage resumes from its last complete
checkpoint when its fingerprint (kept in `.<stage>.partial/.fingerprint`) is unchanged, a `generate` or `evaluate`
stage keeps its partial stores (they resume exactly once), and a `call` stage starts clean. Folders are deleted only
inside the run folder, by renaming them to `.<name>.trash` first, so a kill mid-deletion never leaves a stage that
looks complete.

Launched on several processes, only rank 0 touches the run folder and runs `call` / `generate` / `evaluate` stages;
every rank runs the `train` stages (see `Ranks` and docs/pipelines.md).

Before the first stage runs, every stage's config is built the way the stage will build it (`${stage}` replaced by
the folder it will be), so an unknown key or a bad value in the last stage fails in seconds, naming the recipe's
file, line and stage. `align-distill pipeline RECIPE --STAGE.KEY value` edits a stage's config from the command
line (see `pipeline_command`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
from accelerate import PartialState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from align_distill import configuration
from align_distill.callables import load_callable
from align_distill.configuration import Source
from align_distill.data import DataValidationError, load_rows, validate
from align_distill.data_gen import run_job
from align_distill.data_gen.config import CONFIGS as JOB_CONFIGS
from align_distill.data_gen.config import load_config as load_job_config
from align_distill.distributed import has_accelerator, init_cpu_process_group, launched_world_size
from align_distill.errors import ConfigError, UserError, did_you_mean
from align_distill.evaluation import EvaluateConfig, load_evaluate_config, run_evaluation
from align_distill.fingerprint import config_digest, path_digest
from align_distill.hub import push_run
from align_distill.methods import METHODS, method_module
from align_distill.methods.run import run_method
from align_distill.recipes import check_requirements, resolve_config
from align_distill.redaction import redact
from align_distill.run_files import MARKER

logger = logging.getLogger(__name__)

_REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
# A stage name is a folder name inside the run folder: no separators, no `..`, not hidden (hidden names are the
# pipeline's own: `.<stage>.partial`, `.<stage>.trash`).
_STAGE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
FINGERPRINT_FILE = ".fingerprint"
"""Written into a training stage's `.<stage>.partial/`: the fingerprint its checkpoints belong to."""
# How long the other ranks wait for the main process to finish a `call` or `generate` stage.
WAIT_TIMEOUT = timedelta(days=7)


class PipelineError(UserError, ValueError):
    """A recipe problem, naming the recipe file, line and stage (and key) at fault."""


KINDS = ("train", "generate", "call", "evaluate")
INLINE = "inline"
"""`evaluate: inline`: the evaluation's keys are all in the stage's `config` (no YAML file or recipe under it)."""
STAGE_KEYS = ("name", "config", *KINDS)


def check_stage_name(name: str, where: str) -> None:
    """A PipelineError unless `name` is a plain folder name (see `_STAGE_NAME`)."""
    if not _STAGE_NAME.fullmatch(name) or name == "run_dir":
        raise PipelineError(
            f"{where}: stage names must be plain names (letters, digits, `_`, `.`, `-`; not starting with `.`; "
            f"not `run_dir`): found {name!r}"
        )


def duration(seconds: float) -> str:
    """`41 s`, `2 min 10 s`, `1 h 2 min`."""
    total = int(round(seconds))
    if total < 60:
        return f"{total} s"
    if total < 3600:
        return f"{total // 60} min {total % 60} s"
    return f"{total // 3600} h {total % 3600 // 60} min"


@dataclass
class Stage:
    name: str
    kind: str  # "train" | "generate" | "call" | "evaluate"
    target: str  # method name, job name, or "module:function"
    config: dict[str, Any] = field(default_factory=dict)
    source: Source | None = field(default=None, compare=False, repr=False)  # where `config` came from, for errors

    @classmethod
    def from_dict(cls, raw: dict[str, Any], index: int, source: Source | None = None) -> Stage:
        source = source or Source()
        if not isinstance(raw, dict) or "name" not in raw:
            where = source.where(("stages", index))
            raise PipelineError(f"{where}: stage #{index + 1}: expected a mapping with a `name`, found {raw!r}")
        name = str(raw["name"])
        check_stage_name(name, f"{source.where(('stages', index, 'name'))}: stage #{index + 1}")
        here = source.within("stages", index, context=f"stage `{name}`")
        kinds = [k for k in KINDS if k in raw]
        unknown = [key for key in raw if key not in STAGE_KEYS]
        if unknown:
            hint = did_you_mean(unknown[0], list(STAGE_KEYS))
            raise PipelineError(f"{here.where((unknown[0],))}: unknown key `{unknown[0]}`{hint}")
        if len(kinds) != 1:
            raise PipelineError(f"{here.where()}: give exactly one of `train`, `generate`, `call`, `evaluate`")
        config = raw.get("config") or {}
        if not isinstance(config, dict):
            raise PipelineError(f"{here.where(('config',))}: `config` must be a mapping")
        return cls(
            name=name, kind=kinds[0], target=str(raw[kinds[0]]), config=dict(config), source=here.within("config")
        )

    def config_source(self) -> Source:
        """Where this stage's config came from (file, line, command line), for error messages."""
        return self.source or Source(context=f"stage `{self.name}`")


def _walk_strings(value: Any, fn: Callable[[str], Any]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_walk_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _walk_strings(v, fn) for k, v in value.items()}
    return value


def rename_references(config: dict[str, Any], rename: Mapping[str, str]) -> dict[str, Any]:
    """`config` with every `${name}` whose name is in `rename` pointing at its new name (to place a stage list
    under other stage names, e.g. several variants of one recipe in one run folder)."""

    def one(text: str) -> str:
        return _REFERENCE.sub(lambda m: "${" + rename.get(m.group(1), m.group(1)) + "}", text)

    return _walk_strings(config, one)


def references(stage: Stage) -> list[str]:
    found: list[str] = []
    _walk_strings(stage.config, lambda s: found.extend(_REFERENCE.findall(s)) or s)
    return [name for name in dict.fromkeys(found) if name != "run_dir"]


class Pipeline:
    """Stages run in order under one run folder; see the module docstring."""

    def __init__(self, run_dir: str | os.PathLike, stages: list[Stage], source: Source | None = None):
        self.run_dir = Path(run_dir)
        self.stages = stages
        self.source = source or Source()
        for position, stage in enumerate(stages, start=1):
            check_stage_name(stage.name, f"{self.source.where()}: stage #{position}")
        names = [s.name for s in stages]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise PipelineError(f"{self.source.where()}: duplicate stage names: {sorted(duplicates)}")
        for position, stage in enumerate(stages):
            for ref in references(stage):
                if ref not in names[:position]:
                    where = "a later stage" if ref in names else f"not a stage{did_you_mean(ref, names)}"
                    raise PipelineError(f"{stage.config_source().where()}: references ${{{ref}}}, which is {where}")
        self._fingerprints: dict[str, str] = {}
        self._inputs: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_recipe(
        cls, recipe: dict[str, Any], run_dir: str | os.PathLike | None = None, source: Source | None = None
    ) -> Pipeline:
        source = source or Source()
        if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list):
            raise PipelineError(f"{source.where()}: a pipeline recipe needs a `stages:` list")
        run_dir = run_dir or recipe.get("run_dir")
        if not run_dir:
            raise PipelineError(f"{source.where()}: set `run_dir` in the recipe or pass --run-dir")
        stages = [Stage.from_dict(raw, i, source) for i, raw in enumerate(recipe["stages"])]
        return cls(run_dir, stages, source)

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def resolve(self, stage: Stage) -> dict[str, Any]:
        def substitute(text: str) -> Any:
            def one(match: re.Match) -> str:
                ref = match.group(1)
                return str(self.run_dir if ref == "run_dir" else self.stage_dir(ref))

            return _REFERENCE.sub(one, text)

        return _walk_strings(stage.config, substitute)

    def fingerprint_inputs(self, stage: Stage) -> dict[str, Any]:
        """What a stage's fingerprint hashes: its kind, target, config, the fingerprints of the stages it references
        and the digest of every local file or folder outside the run folder that its config names."""
        resolved = self.resolve(stage)
        inputs: dict[str, str] = {}

        def note_file(text: str) -> str:
            path = Path(text)
            # the run folder itself (`${run_dir}`) counts as inside: hashing it would hash every stage's output
            inside_run = path.resolve() == self.run_dir.resolve() or self.run_dir.resolve() in path.resolve().parents
            if len(text) < 4096 and not inside_run and path.exists():
                inputs[text] = path_digest(path)
            return text

        _walk_strings(resolved, note_file)
        if stage.kind == "evaluate" and stage.target != INLINE:
            try:
                inputs[stage.target] = path_digest(resolve_config(stage.target))
            except ConfigError:
                pass  # named in the error of the stage's check
        return {
            "kind": stage.kind,
            "target": stage.target,
            "config": stage.config,
            "upstream": {ref: self._fingerprints[ref] for ref in references(stage)},
            "files": inputs,
        }

    def fingerprint(self, stage: Stage) -> str:
        return config_digest(self.fingerprint_inputs(stage))

    def _record(self, stage: Stage) -> dict[str, Any] | None:
        marker = self.stage_dir(stage.name) / MARKER
        if not marker.is_file():
            return None
        try:
            return json.loads(marker.read_text())
        except (OSError, ValueError):
            return None

    def is_complete(self, stage: Stage, fingerprint: str) -> bool:
        record = self._record(stage)
        return record is not None and record.get("fingerprint") == fingerprint

    def run(self, from_stage: str | None = None, only: list[str] | None = None) -> dict[str, Path]:
        """Run the stages that are not complete. Launched on several processes (`torchrun`, `accelerate launch`),
        only the main process creates, renames and deletes folders, runs `call`, `generate` and `evaluate` stages and
        writes the stage records; every process runs the `train` stages; the others wait at each step and follow the
        main process's decisions."""
        names = [s.name for s in self.stages]
        for name in [from_stage, *(only or [])]:
            if name is not None and name not in names:
                raise PipelineError(f"unknown stage {name!r}; stages are {names}")
        forced = set(names[names.index(from_stage) :]) if from_stage else set()
        self.check_configs()
        ranks = Ranks.start()
        ranks.on_main(self._open_run_dir, "preparing the run folder")
        ranks.on_main(self.validate_inputs, "validating the training data")
        outputs: dict[str, Path] = {}
        started_run = time.time()
        for position, stage in enumerate(self.stages, start=1):
            outputs[stage.name] = self.stage_dir(stage.name)
            label = f"[{position}/{len(self.stages)}] {stage.name}"
            action, detail = ranks.on_main(lambda stage=stage: self._decide(stage, forced, only), "checking stages")
            if action == "missing":
                raise PipelineError(f"{label}: not complete, but a stage in --only needs it; run it first")
            if action == "skip":
                ranks.say(f"{label}: done (fingerprint {detail[:10]}), skipped")
                continue
            if action != "run":
                continue
            ranks.say(f"{label}: running {stage.kind} {stage.target} ({detail})")
            started = time.time()
            self._run_stage(stage, ranks)
            now = time.time()
            ranks.say(f"{label}: finished in {duration(now - started)}, {duration(now - started_run)} elapsed")
        ranks.finish()
        return outputs

    def _open_run_dir(self) -> None:
        """Create the run folder and finish deleting what a killed run was deleting (`.<name>.trash`)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for trash in self.run_dir.glob(".*.trash"):
            _delete(self._inside(trash, "delete"))

    def _decide(self, stage: Stage, forced: set[str], only: list[str] | None) -> tuple[str, str]:
        """(action, detail) for a stage on the main process: ("skip", fingerprint), ("run", why), ("missing", "")
        or ("needed", "") (complete, not in --only)."""
        inputs = self.fingerprint_inputs(stage)
        fingerprint = config_digest(inputs)
        self._fingerprints[stage.name] = fingerprint
        self._inputs[stage.name] = inputs
        record = self._record(stage)
        complete = record is not None and record.get("fingerprint") == fingerprint
        if only is not None and stage.name not in only:
            return ("needed", "") if complete else ("missing", "")
        if stage.name in forced:
            return "run", "forced by --from"
        if complete:
            return "skip", fingerprint
        return "run", self._why(stage, record, inputs, fingerprint)

    def _why(self, stage: Stage, record: dict[str, Any] | None, inputs: dict[str, Any], fingerprint: str) -> str:
        if record is None:
            mark = self._partial(stage) / FINGERPRINT_FILE
            if stage.kind == "train" and mark.is_file() and mark.read_text().strip() == fingerprint:
                return "interrupted before; resuming"
            return "not run before"
        old = record.get("inputs")
        if not isinstance(old, dict):
            return "fingerprint changed"
        return explain_change(old, redact(json.loads(json.dumps(inputs, default=str))))

    def check_configs(self) -> None:
        """Build every stage's config as the stage will (references replaced by the folders they will be), so that
        an unknown key or a bad value in any stage fails before the first stage runs. Checks that need the outputs
        of earlier stages (their files) happen when the stage runs."""
        for stage in self.stages:
            CHECKS[stage.kind](stage, self.resolve(stage), self.stage_dir(stage.name))

    def validate_inputs(self) -> None:
        """Check every training dataset that already exists before the first model is loaded."""

        problems = []
        for stage in self.stages:
            if stage.kind != "train" or stage.target not in METHODS:
                continue
            path = stage.config.get("dataset_name", stage.config.get("dataset_path"))
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

    def _partial(self, stage: Stage) -> Path:
        return self.run_dir / f".{stage.name}.partial"

    def _run_stage(self, stage: Stage, ranks: Ranks) -> None:
        partial = self._partial(stage)
        if stage.kind != "train":  # `call`, `generate`, `evaluate`: the main process only; the others wait for it
            ranks.on_main(lambda: self._run_on_main(stage), f"in stage `{stage.name}`")
            return
        checkpoint = ranks.on_main(lambda: self._prepare(stage), f"preparing stage `{stage.name}`")
        config = self.resolve(stage)
        run_config = config if checkpoint is None else {**config, "resume_from_checkpoint": checkpoint}
        if checkpoint is not None and "resume_from_checkpoint" not in config:
            ranks.say(f"  resuming from {checkpoint}")
        result = RUNNERS[stage.kind](stage, run_config, partial)
        ranks.barrier()  # every rank is done with the partial folder before it is renamed
        ranks.on_main(lambda: self._finish(stage, config, result, checkpoint), f"finishing stage `{stage.name}`")

    def _run_on_main(self, stage: Stage) -> None:
        self._prepare(stage)
        config = self.resolve(stage)
        self._finish(stage, config, RUNNERS[stage.kind](stage, config, self._partial(stage)), None)

    def _prepare(self, stage: Stage) -> str | None:
        """Clear the stage's folders for a run (main process); the checkpoint a training stage resumes from.

        The finished folder goes first (renamed out of the way, so it never looks complete half-deleted). The
        partial folder is kept by a `generate` or `evaluate` stage (its stores resume exactly once) and by a `train`
        stage whose checkpoints belong to the same fingerprint; otherwise it is cleared."""
        final, partial = self.stage_dir(stage.name), self._partial(stage)
        self._remove(final)
        mark = partial / FINGERPRINT_FILE
        fingerprint = self._fingerprints[stage.name]
        same = mark.is_file() and mark.read_text().strip() == fingerprint
        if not (stage.kind in ("generate", "evaluate") or (stage.kind == "train" and same)):
            self._remove(partial)
        partial.mkdir(parents=True, exist_ok=True)
        if stage.kind != "train":
            return None
        mark.write_text(fingerprint)
        return last_checkpoint(partial) if same else None

    def _finish(self, stage: Stage, config: dict[str, Any], result: Any, checkpoint: str | None) -> None:
        """Write the stage record (secrets redacted) and rename the partial folder into place (main process)."""
        partial = self._partial(stage)
        record = {
            "stage": stage.name,
            "kind": stage.kind,
            "target": stage.target,
            "fingerprint": self._fingerprints[stage.name],
            "inputs": self._inputs[stage.name],
            "config": config,
            "result": result if isinstance(result, (dict, list, str, int, float)) else None,
        }
        if checkpoint is not None:
            record["resumed_from"] = Path(checkpoint).name
        (partial / FINGERPRINT_FILE).unlink(missing_ok=True)
        tmp = partial / f".{MARKER}.tmp"
        tmp.write_text(json.dumps(redact(json.loads(json.dumps(record, default=str))), indent=2))
        os.replace(tmp, partial / MARKER)
        os.replace(self._inside(partial, "rename"), self._inside(self.stage_dir(stage.name), "rename"))

    def _inside(self, path: Path, action: str) -> Path:
        """`path`, after checking that it resolves to an entry directly inside the run folder (a PipelineError
        otherwise): every path the pipeline deletes or renames goes through here first."""
        root = self.run_dir.resolve()
        if path.resolve().parent != root:
            raise PipelineError(
                f"refusing to {action} {path}: it resolves to {path.resolve()}, which is not inside the run folder "
                f"{root}"
            )
        return path

    def _remove(self, path: Path) -> None:
        """Delete a folder inside the run folder. It is first renamed to `.<name>.trash`, so a process killed while
        deleting leaves a trash folder (removed by the next run), never a stage folder that looks complete."""
        if not path.exists() and not path.is_symlink():
            return
        self._inside(path, "delete")
        trash = self._inside(self.run_dir / f".{path.name.lstrip('.')}.trash", "delete")
        if trash.exists() or trash.is_symlink():  # left by a killed run
            _delete(trash)
        os.replace(path, trash)
        _delete(trash)


def _delete(path: Path) -> None:
    """A folder with its contents; a link or a file by itself (a link is never followed)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete `checkpoint-N` in `folder` (as `transformers.trainer_utils.get_last_checkpoint`, but
    the Trainer writes `trainer_state.json` last, so a checkpoint without it was cut short by a kill), or None."""
    found = []
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if step.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(step), path))
    return str(max(found)[1]) if found else None


def explain_change(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """Why a stage reruns, from its recorded fingerprint inputs (`old`) and the current ones (`new`): `config key
    `learning_rate` changed; upstream stage `teacher_sft` changed; input file data/pairs.jsonl changed`."""
    reasons = []
    for key in ("kind", "target"):
        if old.get(key) != new.get(key):
            reasons.append(f"{key} changed ({old.get(key)} → {new.get(key)})")
    before, after = _flatten(old.get("config") or {}), _flatten(new.get("config") or {})
    for key in sorted(before.keys() | after.keys()):
        if key not in before:
            reasons.append(f"config key `{key}` added")
        elif key not in after:
            reasons.append(f"config key `{key}` removed")
        elif before[key] != after[key]:
            reasons.append(f"config key `{key}` changed")
    for kind, name in (("upstream", "upstream stage `{}`"), ("files", "input file {}")):
        before, after = old.get(kind) or {}, new.get(kind) or {}
        for key in sorted(before.keys() | after.keys()):
            if before.get(key) != after.get(key):
                what = "added" if key not in before else "no longer found" if key not in after else "changed"
                reasons.append(f"{name.format(key)} {what}")
    if not reasons:
        return "fingerprint changed"
    more = f"; and {len(reasons) - limit} more" if len(reasons) > limit else ""
    return "; ".join(reasons[:limit]) + more


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Ranks:
    """The processes of a launch (`torchrun`, `accelerate launch`, `deepspeed`) as the pipeline sees them: the main
    process (rank 0) does every file-system change and runs `call` / `generate` stages; the others wait for it at a
    gloo barrier with a long timeout (a generation stage can take hours, longer than NCCL's default timeout) and
    follow its decisions. In a single process every method just runs the function."""

    def __init__(self, group: Any = None, rank: int = 0):
        self.group = group
        self.rank = rank
        self.main = rank == 0

    @classmethod
    def start(cls) -> Ranks:
        """Join the launched processes (creating the process group the trainer will use if none exists yet)."""
        if launched_world_size() <= 1 and not dist.is_initialized():
            return cls()  # one process: it is the main one
        if not dist.is_initialized():
            if has_accelerator():
                PartialState()  # what the trainer will use: NCCL (or the device's backend), one device per rank
            else:
                init_cpu_process_group()
        if dist.get_world_size() <= 1:
            return cls(rank=dist.get_rank())
        return cls(dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT), dist.get_rank())

    def finish(self) -> None:
        """Every rank is done; take the process groups down before the interpreter exits (gloo's threads abort the
        process with "terminate called without an active exception" when a group outlives it)."""
        if self.group is None:
            return
        dist.barrier(group=self.group)
        dist.destroy_process_group(self.group)
        if dist.is_initialized():
            dist.destroy_process_group()

    def say(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def on_main(self, function: Callable[[], Any], what: str) -> Any:
        """`function()` on the main process; its (picklable) result on every process. A failure on the main process
        raises there and, as a PipelineError naming it, on the others."""
        if self.group is None:
            return function() if self.main else None
        message: list[Any] = [None]
        if self.main:
            try:
                message = [("ok", function())]
            except BaseException as error:
                dist.broadcast_object_list([("error", f"{type(error).__name__}: {error}")], src=0, group=self.group)
                raise
        dist.broadcast_object_list(message, src=0, group=self.group)
        status, value = message[0]
        if status == "error":
            raise PipelineError(f"rank {self.rank}: the main process failed {what}: {value}")
        return value


def _train_arguments(stage: Stage, config: dict[str, Any], out: Path) -> tuple[Any, ...]:
    """The method's dataclasses of a `train` stage, built by `align_distill.configuration` (errors name the recipe,
    line and stage); the module comes first."""
    source = stage.config_source()
    if stage.target not in METHODS:
        hint = did_you_mean(stage.target, sorted(METHODS))
        raise ConfigError(f"{source.where()}: unknown method `{stage.target}`{hint}; methods: {', '.join(METHODS)}")
    module = method_module(stage.target)
    hint = f"`align-distill train {stage.target} --help` lists its keys"
    kwargs = configuration.prepare(module.DATACLASSES, {**config, "output_dir": str(out)}, source, stage.target, hint)
    init_cpu_process_group()  # before the training arguments: a CPU-only launch needs an explicit gloo group
    return module, configuration.construct(module.DATACLASSES, kwargs, source)


def _job_config(stage: Stage, config: dict[str, Any], out: Path) -> Any:
    source = stage.config_source()
    if stage.target not in JOB_CONFIGS:
        hint = did_you_mean(stage.target, list(JOB_CONFIGS))
        raise ConfigError(f"{source.where()}: unknown job `{stage.target}`{hint}; jobs: {', '.join(JOB_CONFIGS)}")
    return load_job_config(stage.target, None, {**config, "output_dir": str(out)}, source)


def _call_function(stage: Stage, config: dict[str, Any], out: Path) -> Callable[..., Any]:
    """The function of a `call` stage, checked against the stage's keys (it is called as `function(out, **config)`)."""
    source = stage.config_source()
    try:
        function = load_callable(stage.target, "`call`")
    except ValueError as error:
        raise PipelineError(f"{source.where()}: {error}") from None
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return function
    kinds = {p.kind for p in parameters.values()}
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        named = [
            name
            for name, p in list(parameters.items())[1:]
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
        unknown = [key for key in config if key not in named]
        if unknown:
            raise configuration.unknown_key_error(unknown[0], named, source, (), f"`{stage.target}`")
    try:
        inspect.signature(function).bind(out, **config)
    except TypeError as error:
        raise ConfigError(f"{source.where()}: `{stage.target}`: {error}") from None
    return function


def _evaluate_config(stage: Stage, config: dict[str, Any], out: Path) -> EvaluateConfig:
    """An `evaluate` stage's config: its file or recipe (unless `inline`) with the stage's keys on top, writing into
    the stage folder; errors name the recipe, line and stage."""
    path = None if stage.target == INLINE else stage.target
    try:
        return load_evaluate_config(path, {**config, "output_dir": str(out)}, stage.config_source())
    except ConfigError as error:
        if path is None:
            raise
        raise ConfigError(f"{stage.config_source().where()}: {error}") from None


def _run_evaluate(stage: Stage, config: dict[str, Any], out: Path) -> Any:

    results = run_evaluation(_evaluate_config(stage, config, out))
    return {label: summary["metrics"] | ({"judge": summary["judge"]} if "judge" in summary else {})
            for label, summary in results["models"].items()}  # fmt: skip


def _run_train(stage: Stage, config: dict[str, Any], out: Path) -> Any:

    module, parsed = _train_arguments(stage, config, out)
    return run_method(stage.target, module, parsed, publish=push_run)


def _run_generate(stage: Stage, config: dict[str, Any], out: Path) -> Any:

    return str(run_job(stage.target, _job_config(stage, config, out)))


def _run_call(stage: Stage, config: dict[str, Any], out: Path) -> Any:

    return _call_function(stage, config, out)(out, **config)


RUNNERS: dict[str, Callable[[Stage, dict[str, Any], Path], Any]] = {
    "train": _run_train,
    "generate": _run_generate,
    "call": _run_call,
    "evaluate": _run_evaluate,
}

CHECKS: dict[str, Callable[[Stage, dict[str, Any], Path], Any]] = {
    "train": _train_arguments,
    "generate": _job_config,
    "call": _call_function,
    "evaluate": _evaluate_config,
}


# -- recipes from files and the command line ------------------------------------------------------------------------
def apply_overrides(recipe: dict[str, Any], overrides: Mapping[str, Any], name: str) -> tuple[dict, set]:
    """`recipe` with `--STAGE.KEY value` overrides merged into its stages' configs, and the key paths they set (for
    "command line" in error messages). An unknown stage is an error with the closest stage name."""
    stages = recipe.get("stages") if isinstance(recipe, dict) else None
    if not isinstance(stages, list):
        raise PipelineError(f"{name}: a pipeline recipe needs a `stages:` list")
    names = [str(raw.get("name")) if isinstance(raw, dict) else None for raw in stages]
    stages, overridden = list(stages), set()
    for stage_name, settings in overrides.items():
        if stage_name not in names:
            hint = did_you_mean(stage_name, [n for n in names if n])
            raise PipelineError(
                f"command line: `--{stage_name}.KEY`: {name} has no stage `{stage_name}`{hint}; "
                f"stages: {', '.join(n for n in names if n)}"
            )
        if not isinstance(settings, Mapping):
            raise PipelineError(f"command line: `--{stage_name}` needs a key: --{stage_name}.KEY value")
        index = names.index(stage_name)
        stage = dict(stages[index])
        stage["config"] = configuration.merge(stage.get("config") or {}, dict(settings))
        stages[index] = stage
        overridden |= {("stages", index, "config", *path) for path in configuration.leaf_paths(settings)}
    return {**recipe, "stages": stages}, overridden


def load_recipe(
    path: str | os.PathLike, overrides: Mapping[str, Any] | None = None, run_dir: str | None = None
) -> tuple[dict[str, Any], Source]:
    """A recipe (a file or a shipped recipe name) with `--STAGE.KEY value` overrides, and where its keys came from."""
    resolved = resolve_config(path)
    name = os.fspath(path) if Path(os.fspath(path)).expanduser() == resolved else os.fspath(resolved)
    recipe, lines = configuration.load_yaml(resolved, name)
    overridden: set = set()
    if overrides:
        recipe, overridden = apply_overrides(recipe, overrides, name)
    check_requirements(resolved, {**recipe, "run_dir": run_dir or recipe.get("run_dir")})
    return recipe, Source(file=name, lines=lines, overridden=overridden)


def run_pipeline_file(
    path: str | os.PathLike,
    run_dir: str | None = None,
    from_stage: str | None = None,
    only: list[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Run the recipe at `path` (or the shipped recipe of that name) with `overrides` ({stage: {key: value}})."""
    recipe, source = load_recipe(path, overrides, run_dir)
    return Pipeline.from_recipe(recipe, run_dir=run_dir, source=source).run(from_stage=from_stage, only=only)


PIPELINE_USAGE = """usage: align-distill pipeline RECIPE [--run-dir DIR] [--from STAGE] [--only STAGE ...]
                              [--STAGE.KEY value ...]

Run a multi-stage recipe (a YAML file or a shipped recipe name, see `align-distill recipes list`); finished stages
are skipped (their fingerprint matches).

  --run-dir DIR          the run folder (default: the recipe's run_dir)
  --from STAGE           rerun this stage and every later one
  --only STAGE ...       run only these stages (the stages they need must be complete)
  --STAGE.KEY VALUE      set KEY in the config of stage STAGE, e.g. --dckd_student.learning_rate 1e-5
                         (VALUE is read as YAML; KEY may be dotted: --rank.judge.kind llm)"""


def pipeline_command(argv: list[str]) -> int:
    """`align-distill pipeline RECIPE [options]` (see PIPELINE_USAGE); returns the exit code."""
    if not argv or argv[0] in ("-h", "--help") or "-h" in argv or "--help" in argv:
        print(PIPELINE_USAGE)
        return 0 if argv else 2
    recipe, overrides = argv[0], configuration.parse_overrides(argv[1:])
    if recipe.startswith("--"):
        raise ConfigError("command line: give the RECIPE first: align-distill pipeline RECIPE [--key value ...]")
    run_dir = overrides.pop("run_dir", None)
    from_stage = overrides.pop("from", None)
    only = overrides.pop("only", None)
    if isinstance(only, str):
        only = [part.strip() for part in only.split(",") if part.strip()]
    elif only is not None and not isinstance(only, list):
        only = [only]
    run_pipeline_file(
        recipe,
        run_dir=None if run_dir is None else str(run_dir),
        from_stage=None if from_stage is None else str(from_stage),
        only=None if only is None else [str(name) for name in only],
        overrides=overrides,
    )
    return 0
