"""Multi-stage recipes: each stage writes `<run_dir>/<stage>/`, is fingerprinted, and is skipped when done.

A recipe is a list of named stages run in order:

    run_dir: runs/teacher
    stages:
      - name: teacher_sft
        train: sft                     # or `generate: <job>`, or `call: module:function`
        config: {model_name_or_path: models/teacher, dataset_name: data/sft.jsonl, max_steps: 200}
      - name: teacher_dpo
        train: dpo
        config: {model_name_or_path: "${teacher_sft}", dataset_name: data/pairs.jsonl}

`${stage}` in a config value is that stage's output folder (and makes this stage depend on it); `${run_dir}` is
the run folder. A stage's fingerprint hashes its kind, its config, the fingerprints of the stages it references
and the content of the local files it names, so changing any input reruns exactly the stages downstream of it.

A stage runs in `<run_dir>/.<stage>.partial/` and is renamed to `<stage>/` with a `stage.json` marker only when it
finished: an interrupted stage never looks complete and is redone from a clean folder (a `generate` stage keeps its
partial folder, because the store itself resumes exactly once).

Before the first stage runs, every stage's config is built the way the stage will build it (`${stage}` replaced by
the folder it will be), so an unknown key or a bad value in the last stage fails in seconds, naming the recipe's
file, line and stage. `align-distill pipeline RECIPE --STAGE.KEY value` edits a stage's config from the command
line (see `pipeline_command`).
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align_distill import configuration
from align_distill.callables import load_callable
from align_distill.configuration import Source
from align_distill.data import DataValidationError, load_rows, validate
from align_distill.data_gen import run_job
from align_distill.data_gen.config import CONFIGS as JOB_CONFIGS
from align_distill.data_gen.config import load_config as load_job_config
from align_distill.distributed import init_cpu_process_group
from align_distill.errors import ConfigError, UserError
from align_distill.fingerprint import config_digest, path_digest
from align_distill.hub import push_run
from align_distill.methods import METHODS, method_module
from align_distill.methods.run import run_method
from align_distill.recipes import check_requirements, resolve_config
from align_distill.run_files import MARKER

logger = logging.getLogger(__name__)

_REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")


class PipelineError(UserError, ValueError):
    """A recipe problem, naming the recipe file, line and stage (and key) at fault."""


KINDS = ("train", "generate", "call")
STAGE_KEYS = ("name", "config", *KINDS)


def _suggestion(name: str, names: list[str]) -> str:
    match = difflib.get_close_matches(str(name), names, n=1)
    return f" (did you mean `{match[0]}`?)" if match else ""


@dataclass
class Stage:
    name: str
    kind: str  # "train" | "generate" | "call"
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
        here = source.within("stages", index, context=f"stage `{name}`")
        kinds = [k for k in KINDS if k in raw]
        unknown = [key for key in raw if key not in STAGE_KEYS]
        if unknown:
            hint = _suggestion(unknown[0], list(STAGE_KEYS))
            raise PipelineError(f"{here.where((unknown[0],))}: unknown key `{unknown[0]}`{hint}")
        if len(kinds) != 1:
            raise PipelineError(f"{here.where()}: give exactly one of `train`, `generate`, `call`")
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
        names = [s.name for s in stages]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise PipelineError(f"{self.source.where()}: duplicate stage names: {sorted(duplicates)}")
        for position, stage in enumerate(stages):
            for ref in references(stage):
                if ref not in names[:position]:
                    where = "a later stage" if ref in names else f"not a stage{_suggestion(ref, names)}"
                    raise PipelineError(f"{stage.config_source().where()}: references ${{{ref}}}, which is {where}")
        self._fingerprints: dict[str, str] = {}

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

    def fingerprint(self, stage: Stage) -> str:
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
        payload = {
            "kind": stage.kind,
            "target": stage.target,
            "config": stage.config,
            "upstream": {ref: self._fingerprints[ref] for ref in references(stage)},
            "files": inputs,
        }
        return config_digest(payload)

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
        self.check_configs()
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


def _train_arguments(stage: Stage, config: dict[str, Any], out: Path) -> tuple[Any, ...]:
    """The method's dataclasses of a `train` stage, built by `align_distill.configuration` (errors name the recipe,
    line and stage); the module comes first."""
    source = stage.config_source()
    if stage.target not in METHODS:
        hint = _suggestion(stage.target, sorted(METHODS))
        raise ConfigError(f"{source.where()}: unknown method `{stage.target}`{hint}; methods: {', '.join(METHODS)}")
    module = method_module(stage.target)
    hint = f"`align-distill train {stage.target} --help` lists its keys"
    kwargs = configuration.prepare(module.DATACLASSES, {**config, "output_dir": str(out)}, source, stage.target, hint)
    init_cpu_process_group()  # before the training arguments: a CPU-only launch needs an explicit gloo group
    return module, configuration.construct(module.DATACLASSES, kwargs, source)


def _job_config(stage: Stage, config: dict[str, Any], out: Path) -> Any:
    source = stage.config_source()
    if stage.target not in JOB_CONFIGS:
        hint = _suggestion(stage.target, list(JOB_CONFIGS))
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
}

CHECKS: dict[str, Callable[[Stage, dict[str, Any], Path], Any]] = {
    "train": _train_arguments,
    "generate": _job_config,
    "call": _call_function,
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
            hint = _suggestion(stage_name, [n for n in names if n])
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
