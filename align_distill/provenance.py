"""What a published student is made of, read from its run folder (the model card renders it: `model_card.py`).

`collect_provenance(path)` accepts a pipeline run folder (stages with `stage.json` markers), one stage folder, or a
plain `align-distill train` output folder (with its `align_distill_run.json` record). It follows the stage configs
back through the run: the student's base model, the teachers / references / judges (with a revision for hub ids,
a content digest for local folders), the datasets (content digests), the data-generation jobs and their sampling
settings (with the store's fingerprint), the method's hyperparameters and the evaluation numbers.

Secrets never reach the record (`align_distill.redaction.redact`: secret fields by exact name, credential-shaped
values anywhere), and neither do the machine's folders: a local path is shown relative to the run folder, or as
`local:<name>` when outside it (`publicize`). Bookkeeping settings (logging, saving, dataloader, hub, ...) are left
out of the hyperparameters (`is_hyperparameter`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import align_distill
from align_distill.errors import UserError
from align_distill.fingerprint import model_digest
from align_distill.methods.run import framework_versions
from align_distill.redaction import redact
from align_distill.run_files import EVAL_FILE, MARKER, RUN_RECORD

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# a snapshot folder of the hub cache: <cache>/models--ORG--NAME/snapshots/<revision>
_HUB_CACHE_SNAPSHOT = re.compile(r"(?:^|[\\/])models--([^\\/]+?)--([^\\/]+)[\\/]snapshots[\\/][^\\/]+[\\/]?$")
ADAPTER_FILES = ("adapter_config.json",)
MODEL_FILES = ("config.json",)
# Keys of a training config (or data-generation job) that name frozen models: teachers, references, judges.
_FROZEN_MODEL_KEY = re.compile(r"^(?!model_name_or_path$).*(model_name_or_path|model_path)$")
# new names first; the deprecated ones (align_distill.vocabulary) still name datasets in older recipes and records
DATASET_KEYS = (
    "dataset_name",
    "eval_dataset_path",
    "preference_path",
    "signals_path",
    "dataset_path",
    "teacher_signals_path",
)
SAMPLING_KEYS = ("n", "temperature", "top_p", "top_k", "max_completion_length", "max_new_tokens", "stop", "seed")
# Paths and bookkeeping that say nothing about the method: left out of the hyperparameter table (exact names, then
# prefixes). The models and datasets are listed on their own, with identities.
NOT_HYPERPARAMETERS = {
    *("output_dir", "overwrite_output_dir", "run_name", "project", "model_name_or_path", "model_revision"),
    *("accelerator_config", "parallelism_config", "debug", "report_to", "disable_tqdm", "local_rank"),
    *("resume_from_checkpoint", "ignore_data_skip", "skip_memory_metrics", "do_train", "do_eval", "do_predict"),
    *("use_cpu", "full_determinism", "restore_callback_states_from_checkpoint", "label_names", "progress"),
    *("length_column_name", "enable_jit_checkpoint", "torch_empty_cache_steps", "deepspeed", "fsdp_config"),
    *("hub_token", "trust_remote_code", "attn_implementation", "eval_on_start", "batch_eval_metrics"),
    *DATASET_KEYS,
}
NOT_HYPERPARAMETER_PREFIXES = ("logging_", "log_", "save_", "dataloader_", "hub_", "push_to_hub", "ddp_", "trackio_")
NOT_HYPERPARAMETER_PREFIXES += ("eval_do_", "eval_use_", "include_", "torch_compile_")
FRAMEWORKS_SHOWN = ("torch", "transformers", "trl", "peft", "align-distill")
VISION_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
_ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/])")


def is_hyperparameter(key: str) -> bool:
    """Whether a config key says something about the method (not a path, a model, logging or saving bookkeeping)."""
    return (
        key not in NOT_HYPERPARAMETERS
        and not key.startswith(NOT_HYPERPARAMETER_PREFIXES)
        and not _FROZEN_MODEL_KEY.match(key)
        and not key.endswith("_revision")
    )


class ProvenanceError(UserError, ValueError):
    """The folder holds no model to publish, or the requested stage is not in the run."""


# -- identities of models and data -------------------------------------------------------------------------------
def store_fingerprint(path: Path) -> str | None:
    """The job fingerprint a data_gen store records in its manifest(s), if `path` is a store."""
    manifests = sorted(path.glob("manifest*.json")) if path.is_dir() else []
    for manifest in manifests:
        try:
            return json.loads(manifest.read_text()).get("fingerprint_sha256")
        except (OSError, ValueError):
            continue
    return None


class Run:
    """The stages of a pipeline run folder (`stage.json` markers), for following references between them."""

    def __init__(self, root: Path | None):
        self.root = root.resolve() if root is not None else None
        self.stages: dict[str, dict[str, Any]] = {}
        if self.root is not None:
            for marker in sorted(self.root.glob(f"*/{MARKER}")):
                try:
                    self.stages[marker.parent.name] = {
                        **json.loads(marker.read_text()),
                        "_mtime": marker.stat().st_mtime,
                    }
                except (OSError, ValueError):
                    continue

    def locate(self, value: str) -> tuple[str, Path] | None:
        """(stage name, path) when `value` is a path inside one of this run's stage folders."""
        if self.root is None or not isinstance(value, str) or not value or len(value) > 4096:
            return None
        try:
            path = Path(value).expanduser().resolve()
            relative = path.relative_to(self.root)
        except (OSError, ValueError):
            return None
        if not relative.parts or relative.parts[0] not in self.stages:
            return None
        return relative.parts[0], path

    def upstream(self, name: str) -> list[str]:
        """Every stage `name` depends on (through paths in its config), in the order the run finished them."""
        seen: list[str] = []
        pending = [name]
        while pending:
            current = pending.pop(0)
            for value in _strings(self.stages[current].get("config", {})):
                found = self.locate(value)
                if found and found[0] != current and found[0] not in seen and found[0] != name:
                    seen.append(found[0])
                    pending.append(found[0])
        return sorted(seen, key=lambda stage: self.stages[stage]["_mtime"])


def public_path(value: str | Path, run: Run) -> str:
    """A local path as the published record shows it: relative to the run folder when inside it, else
    `local:<name>`. The machine's folders stay private; the content digest recorded next to it identifies the data."""
    path = Path(value).expanduser()
    if run.root is not None:
        try:
            return str(path.resolve().relative_to(run.root))
        except (OSError, ValueError):
            pass
    return f"local:{path.name}"


def publicize(value: Any, run: Run) -> Any:
    """`value` with every string that is an absolute local path replaced by its `public_path`."""
    if isinstance(value, dict):
        return {k: publicize(v, run) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [publicize(v, run) for v in value]
    if isinstance(value, str) and "\n" not in value and len(value) < 4096 and _ABSOLUTE.match(value):
        return public_path(value, run)
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def describe_model(run: Run, value: str, revision: str | None = None, depth: int = 0) -> dict[str, Any]:
    """Where a model came from: a stage of this run (and, for a trained stage, what it was trained from), a local
    folder (content digest) or a hub id (revision; "unpinned" when none was given)."""
    found = run.locate(value)
    if found is not None:
        name, path = found
        stage = run.stages[name]
        record: dict[str, Any] = {"stage": name, "kind": stage.get("kind"), "target": stage.get("target")}
        if path.exists():
            record["sha256"] = model_digest(path)
        config = stage.get("config", {})
        if stage.get("kind") == "train" and isinstance(config.get("model_name_or_path"), str) and depth < 16:
            record["from"] = describe_model(run, config["model_name_or_path"], config.get("model_revision"), depth + 1)
        elif path != run.root / name:
            record["path"] = str(path.relative_to(run.root))
        return record
    path = Path(value).expanduser()
    if path.exists():
        return {"path": public_path(path, run), "sha256": model_digest(path)}
    return {"hub_id": value, "revision": revision or "unpinned (main at training time)"}


def is_hub_id(value: Any) -> bool:
    """`value` reads as an `ORG/NAME` hub id and is not a folder of this machine."""
    return isinstance(value, str) and bool(_HUB_ID.match(value)) and not Path(value).expanduser().exists()


def base_hub_id(provenance: dict[str, Any], local_base: str) -> str | None:
    """The hub id of an adapter's local base folder `local_base`, when the run knows it: the folder is a snapshot
    of the hub cache (`models--ORG--NAME/snapshots/REV`), or the training config named the base model by its hub id
    (the folder is its download). None when neither holds: a folder the run knows only by its content."""
    match = _HUB_CACHE_SNAPSHOT.search(local_base)
    if match and _HUB_ID.match(f"{match.group(1)}/{match.group(2)}"):
        return f"{match.group(1)}/{match.group(2)}"
    trained_from = (provenance.get("student") or {}).get("trained_from") or {}
    hub_id = trained_from.get("hub_id")  # a stage of the run is another model than its base: never followed
    return hub_id if is_hub_id(hub_id) else None


def origin(model: dict[str, Any]) -> dict[str, Any]:
    """The first model of a `describe_model` chain (the base the whole run started from)."""
    while "from" in model:
        model = model["from"]
    return model


def chain(model: dict[str, Any]) -> str:
    """`teacher_dpo (train dpo) ← teacher_sft (train sft) ← models/teacher` as text."""
    parts = []
    while True:
        if "stage" in model:
            label = model.get("path") or model["stage"]
            parts.append(f"{label} ({model['kind']} {model['target']})" if model.get("kind") == "train" else label)
        elif "hub_id" in model:
            parts.append(f"{model['hub_id']}@{model['revision']}")
        else:
            parts.append(model["path"])
        if "from" not in model:
            return " ← ".join(parts)
        model = model["from"]


def describe_dataset(run: Run, value: str) -> dict[str, Any]:
    found = run.locate(value)
    record: dict[str, Any] = {}
    path = Path(value).expanduser()
    if found is not None:
        name, path = found
        record["stage"] = name
        record["path"] = str(path.relative_to(run.root))
    elif path.exists():
        record["path"] = public_path(path, run)
    else:
        return {"hub_id": value}
    if path.exists():
        store = store_fingerprint(path)
        record["fingerprint"] = f"store:{store}" if store else f"sha256:{model_digest(path)}"
    return record


# -- the record ------------------------------------------------------------------------------------------------------
def find_model(path: str | Path, stage: str | None = None) -> tuple[Path, Run, str | None]:
    """(model folder, its run, its stage name) for a run folder, a stage folder or a plain training output."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ProvenanceError(f"{path}: not a folder")
    if (path / MARKER).exists():
        if stage is not None and stage != path.name:
            raise ProvenanceError(f"{path} is the stage {path.name!r}; --stage {stage!r} names another one")
        return path, Run(path.parent), path.name
    run = Run(path)
    if not run.stages:
        if stage is not None:
            raise ProvenanceError(f"{path} is not a pipeline run folder (no */{MARKER}); leave out --stage")
        if not is_model_folder(path):
            raise ProvenanceError(f"{path}: no model or adapter (config.json / adapter_config.json) to publish")
        return path, Run(None), None
    if stage is not None:
        if stage not in run.stages:
            raise ProvenanceError(f"{path}: no finished stage {stage!r}; finished stages: {', '.join(run.stages)}")
        return path / stage, run, stage
    trained = [n for n, s in run.stages.items() if s.get("kind") == "train" and is_model_folder(path / n)]
    if not trained:
        raise ProvenanceError(f"{path}: no finished training stage holds a model; stages: {', '.join(run.stages)}")
    latest = max(trained, key=lambda n: run.stages[n]["_mtime"])  # the run's final model
    return path / latest, run, latest


def is_model_folder(path: Path) -> bool:
    return any((path / name).exists() for name in ADAPTER_FILES + MODEL_FILES)


def collect_provenance(path: str | Path, stage: str | None = None) -> dict[str, Any]:
    """The publishable record of a trained student (see the module docstring); secrets redacted."""
    model_dir, run, stage_name = find_model(path, stage)
    run_record = _read_json(model_dir / RUN_RECORD) or {}
    stage_record = run.stages.get(stage_name, {}) if stage_name else {}
    config: dict[str, Any] = dict(stage_record.get("config") or {})
    if not config and run_record.get("args"):
        for values in run_record["args"].values():  # a plain `align-distill train` output: its recorded args
            config.update({k: v for k, v in values.items() if v is not None})
    method = stage_record.get("target") or run_record.get("method") or "unknown"
    provenance: dict[str, Any] = {
        "align_distill_version": align_distill.__version__,
        "method": method,
        "format": "adapter" if (model_dir / "adapter_config.json").exists() else "model",
        "stage": stage_name,
        "pipeline_tag": "image-text-to-text" if _is_vision(model_dir) else "text-generation",
        "hyperparameters": {k: v for k, v in sorted(config.items()) if is_hyperparameter(k)},
        "student": _student(run, config, model_dir),
        "teachers": _teachers(run, config, stage_name),
        "datasets": _datasets(run, config, stage_name),
        "data_gen": _data_gen(run, stage_name),
        "evaluation": _evaluation(run, model_dir),
        "training_result": stage_record.get("result") or run_record.get("result"),
        "stages": {
            name: {k: run.stages[name].get(k) for k in ("kind", "target", "fingerprint")}
            for name in ([*run.upstream(stage_name), stage_name] if stage_name else [])
        },
        "framework_versions": run_record.get("framework_versions") or framework_versions(),
    }
    return publicize(redact(provenance), run)


def _is_vision(model_dir: Path) -> bool:
    """A vision-language student: processor files next to it, or a `vision_config` in its config."""
    config = _read_json(model_dir / "config.json") or {}
    return any((model_dir / name).exists() for name in VISION_FILES) or "vision_config" in config


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _student(run: Run, config: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    adapter = _read_json(model_dir / "adapter_config.json") or {}
    base = config.get("model_name_or_path") or adapter.get("base_model_name_or_path")
    if not isinstance(base, str):
        return {}
    trained_from = describe_model(run, base, config.get("model_revision"))
    return {"trained_from": trained_from, "base": origin(trained_from), "chain": chain(trained_from)}


def _teachers(run: Run, config: dict[str, Any], stage_name: str | None) -> list[dict[str, Any]]:
    """Frozen models of the training stage, then the models of the data_gen stages it read."""
    found = []
    for key, value in sorted(config.items()):
        if _FROZEN_MODEL_KEY.match(key) and isinstance(value, str) and value:
            revision = config.get(key.replace("model_name_or_path", "revision").replace("model_path", "revision"))
            described = describe_model(run, value, revision)
            found.append({"role": key, "model": described, "chain": chain(described)})
    for name in run.upstream(stage_name) if stage_name else []:
        stage = run.stages[name]
        if stage.get("kind") != "generate":
            continue
        for role, spec in _job_models(stage.get("target", ""), stage.get("config", {})):
            described = describe_model(run, spec["model"], spec.get("revision"))
            found.append({"role": f"{name}: {role}", "model": described, "chain": chain(described)})
    return found


def _job_models(job: str, config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(role, generator spec) of the models a data_gen job ran."""
    if job == "signals":
        specs = [t if isinstance(t, dict) else {"model": t} for t in config.get("teachers") or []]
        return [(f"{job} teacher {s.get('name', 'teacher')}", s) for s in specs if s.get("model")]
    if job == "rank":
        judge = config.get("judge") or {}
        judge = judge if isinstance(judge, dict) else {"model": judge}
        return [("judge", judge)] if judge.get("model") else []
    if config.get("model"):
        return [(f"{job} model", config)]
    return []


def _datasets(run: Run, config: dict[str, Any], stage_name: str | None) -> list[dict[str, Any]]:
    found = []
    for key in DATASET_KEYS:
        if isinstance(config.get(key), str) and config[key]:
            found.append({"role": key, **describe_dataset(run, config[key])})
    for name in run.upstream(stage_name) if stage_name else []:
        stage = run.stages[name]
        value = (stage.get("config") or {}).get("input")
        if stage.get("kind") == "generate" and isinstance(value, str):
            found.append({"role": f"{name}: input", **describe_dataset(run, value)})
    return found


def _data_gen(run: Run, stage_name: str | None) -> list[dict[str, Any]]:
    jobs = []
    for name in run.upstream(stage_name) if stage_name else []:
        stage = run.stages[name]
        if stage.get("kind") != "generate":
            continue
        config = stage.get("config") or {}
        settings = {k: v for k, v in config.items() if k in SAMPLING_KEYS}
        job = {"stage": name, "job": stage.get("target"), "settings": settings}
        models = _job_models(stage.get("target", ""), config)
        job["models"] = {role: {k: v for k, v in spec.items() if k != "name"} for role, spec in models}
        if stage.get("target") == "rank" and isinstance(config.get("judge"), dict):
            job["judge"] = config["judge"]
        job["store_fingerprint"] = store_fingerprint(run.root / name)
        jobs.append(job)
    return jobs


def _evaluation(run: Run, model_dir: Path) -> dict[str, Any] | None:
    """eval.json next to the model, or the eval.json of the run's stage that evaluated this model (an `evaluate` stage
    or a `call` stage with a `models` mapping: label -> path, or label -> {model: path, ...}; eval.json: label ->
    metrics). A stage that evaluated this model wins over one that did not."""
    own = _read_json(model_dir / EVAL_FILE)
    if own is not None:
        return {"results": own, "this_model": None, "source": "eval.json"}
    found = []
    for name, stage in run.stages.items():
        results = _read_json(run.root / name / EVAL_FILE)
        if results is None:
            continue
        config = stage.get("config") or {}
        models = config.get("models") or {}
        mine = [label for label, spec in models.items() if _evaluated_path(run, spec) == (model_dir.name, model_dir)]
        record = {"results": results, "this_model": mine[0] if mine else None, "source": f"{name}/eval.json"}
        if isinstance(config.get("prompts"), str):
            record["dataset"] = config["prompts"]
        found.append(record)
    return next((r for r in found if r["this_model"]), found[0] if found else None)


def _evaluated_path(run: Run, spec: Any) -> tuple[str, Path] | None:
    """Where an evaluated model's folder is in the run (its spec is a path or a mapping with `model`)."""
    path = spec.get("model") if isinstance(spec, dict) else spec
    return run.locate(str(path)) if path else None
