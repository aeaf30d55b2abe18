"""What a published student is made of — read from its run folder — and the model card that says it.

`collect_provenance(path)` accepts a pipeline run folder (stages with `stage.json` markers), one stage folder, or a
plain `align-distill train` output folder (with its `align_distill_run.json` record). It follows the stage configs
back through the run: the student's base model, the teachers / references / judges (with a revision for hub ids,
a content digest for local folders), the datasets (content digests), the data-generation jobs and their sampling
settings (with the store's fingerprint), the method's hyperparameters and the evaluation numbers. `render_card`
turns that record into the README.md of the hub repository.

Secrets never reach the record: every value under a key that names a credential (token, api_key, password, ...)
is replaced by "<redacted>", and so is any string that looks like a Hugging Face token.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import align_distill

MARKER = "stage.json"  # align_distill.pipeline.MARKER (not imported: the pipeline pulls in the trainers)
RUN_RECORD = "align_distill_run.json"
REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"token|secret|passw|api[_-]?key|authorization|credential|cookie", re.IGNORECASE)
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ADAPTER_FILES = ("adapter_config.json",)
MODEL_FILES = ("config.json",)
# Keys of a training config (or data-generation job) that name frozen models: teachers, references, judges.
_FROZEN_MODEL_KEY = re.compile(r"^(?!model_name_or_path$).*(model_name_or_path|model_path)$")
DATASET_KEYS = ("dataset_path", "eval_dataset_path", "preference_path", "signals_path", "teacher_signals_path")
SAMPLING_KEYS = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "stop", "seed")
# Paths and bookkeeping that say nothing about the method: left out of the hyperparameter table.
NOT_HYPERPARAMETERS = {"output_dir", "logging_dir", "run_name", "model_name_or_path", "dataset_path"}


class ProvenanceError(ValueError):
    """The folder holds no model to publish, or the requested stage is not in the run."""


# -- secrets ----------------------------------------------------------------------------------------------------------
def redact(value: Any, key: str = "") -> Any:
    """`value` with credentials replaced: values under secret-sounding keys, and HF-token-shaped strings."""
    if key and _SECRET_KEY.search(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _HF_TOKEN.sub(REDACTED, value)
    return value


# -- identities of models and data -------------------------------------------------------------------------------
def digest_folder(path: Path) -> str:
    """sha256 over the weight/config digests of a model folder (data_gen's model fingerprint), or a file/folder."""
    from align_distill.data_gen.jobs.fingerprint import model_fingerprint

    if path.is_dir() and ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
        files = model_fingerprint(str(path))["files"]
        if (path / "adapter_config.json").exists():
            from align_distill.data_gen.jobs.fingerprint import file_digest

            files = {**files, **{f.name: file_digest(f) for f in sorted(path.glob("adapter_*")) if f.is_file()}}
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    from align_distill.pipeline import file_fingerprint

    return file_fingerprint(path)


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
            record["sha256"] = digest_folder(path)
        config = stage.get("config", {})
        if stage.get("kind") == "train" and isinstance(config.get("model_name_or_path"), str) and depth < 16:
            record["from"] = describe_model(run, config["model_name_or_path"], config.get("model_revision"), depth + 1)
        elif path != run.root / name:
            record["path"] = str(path.relative_to(run.root))
        return record
    path = Path(value).expanduser()
    if path.exists():
        return {"path": str(path.resolve()), "sha256": digest_folder(path)}
    return {"hub_id": value, "revision": revision or "unpinned (main at training time)"}


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
        record["path"] = str(path.resolve())
    else:
        return {"hub_id": value}
    if path.exists():
        store = store_fingerprint(path)
        record["fingerprint"] = f"store:{store}" if store else f"sha256:{digest_folder(path)}"
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
        "hyperparameters": {k: v for k, v in sorted(config.items()) if k not in NOT_HYPERPARAMETERS},
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
    }
    return redact(provenance)


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
    """eval.json next to the model, or the run's evaluate stage(s) (quickstart format: label -> metrics)."""
    own = _read_json(model_dir / "eval.json")
    if own is not None:
        return {"results": own, "this_model": None, "source": "eval.json"}
    for name, stage in run.stages.items():
        results = _read_json(run.root / name / "eval.json")
        if results is None:
            continue
        models = (stage.get("config") or {}).get("models") or {}
        mine = [label for label, path in models.items() if run.locate(str(path)) == (model_dir.name, model_dir)]
        return {"results": results, "this_model": mine[0] if mine else None, "source": f"{name}/eval.json"}
    return None


# -- the card --------------------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _identity(model: dict[str, Any]) -> str:
    if "hub_id" in model:
        return f"revision {model['revision']}"
    return f"sha256:{model['sha256'][:16]}" if model.get("sha256") else ""


def render_card(provenance: dict[str, Any], repo_id: str) -> str:
    """README.md for the hub repository (YAML metadata + markdown), from `collect_provenance`'s record."""
    sections = (
        _card_front_matter,
        _card_summary,
        _card_models,
        _card_training,
        _card_data,
        _card_data_gen,
        _card_evaluation,
        _card_result,
        _card_stages,
    )
    lines = [line for section in sections for line in section(provenance, repo_id)]
    return "\n".join(lines + ["The full record is `align_distill.json` in this repository.", ""])


def _card_front_matter(p: dict[str, Any], repo_id: str) -> list[str]:
    adapter = p["format"] == "adapter"
    base = p["student"].get("base", {})
    hub_base = p.get("published_base_model") if _HUB_ID.match(str(p.get("published_base_model"))) else None
    hub_base = hub_base or base.get("hub_id")
    tags = ("align-distill", "distillation", p["method"], "trl", *(["lora"] if adapter else []))
    hub_datasets = sorted({d["hub_id"] for d in p["datasets"] if "hub_id" in d})
    return [
        "---",
        f"library_name: {'peft' if adapter else 'transformers'}",
        *([f"base_model: {hub_base}"] if hub_base else []),
        "tags:",
        *[f"- {tag}" for tag in tags],
        *(["datasets:", *[f"- {d}" for d in hub_datasets]] if hub_datasets else []),
        "---",
        "",
    ]


def _card_summary(p: dict[str, Any], repo_id: str) -> list[str]:
    adapter = p["format"] == "adapter"
    where = f" (stage `{p['stage']}` of a pipeline run)" if p["stage"] else ""
    loader = "peft import AutoPeftModelForCausalLM" if adapter else "transformers import AutoModelForCausalLM"
    cls = loader.rsplit(" ", 1)[-1]
    return [
        f"# {repo_id}",
        "",
        f"A student model distilled with align-distill {p['align_distill_version']}, method **{p['method']}**{where}. "
        f"This repository holds {'a LoRA adapter' if adapter else 'the full model weights'} and the tokenizer.",
        "",
        "```python",
        f"from {loader}",
        f'model = {cls}.from_pretrained("{repo_id}")',
        "```",
        "",
        *(
            [
                f"The adapter's `base_model_name_or_path` is `{p.get('published_base_model')}`, a local folder of "
                "the training machine: load the base model yourself and attach the adapter with "
                "`PeftModel.from_pretrained(base, repo_id)`.",
                "",
            ]
            if adapter and not _HUB_ID.match(str(p.get("published_base_model")))
            else []
        ),
    ]


def _card_models(p: dict[str, Any], repo_id: str) -> list[str]:
    rows = []
    if p["student"]:
        base, trained_from = p["student"]["base"], p["student"]["trained_from"]
        rows.append(("student (base)", chain(base), _identity(base)))
        if trained_from != base:
            rows.append(("student (trained from)", p["student"]["chain"], _identity(trained_from)))
    rows += [(t["role"], t["chain"], _identity(t["model"])) for t in p["teachers"]]
    return ["## Models", "", *_table(("role", "model", "identity"), rows), ""]


def _card_training(p: dict[str, Any], repo_id: str) -> list[str]:
    return [
        f"## Training: {p['method']}",
        "",
        *_table(("hyperparameter", "value"), list(p["hyperparameters"].items())),
        "",
        f"Values not listed are the defaults of align-distill {p['align_distill_version']}.",
        "",
    ]


def _card_data(p: dict[str, Any], repo_id: str) -> list[str]:
    if not p["datasets"]:
        return []
    rows = [(d["role"], d.get("hub_id") or d.get("path"), d.get("fingerprint", "")) for d in p["datasets"]]
    return ["## Data", "", *_table(("role", "dataset", "fingerprint"), rows), ""]


def _card_data_gen(p: dict[str, Any], repo_id: str) -> list[str]:
    lines = []
    for job in p["data_gen"]:
        rows = [
            *job["settings"].items(),
            *job["models"].items(),
            ("store fingerprint", job["store_fingerprint"] or ""),
        ]
        lines += [
            f"## Data generation: `{job['job']}` (stage `{job['stage']}`)",
            "",
            *_table(("setting", "value"), rows),
        ]
        lines.append("")
    return lines


def _card_evaluation(p: dict[str, Any], repo_id: str) -> list[str]:
    evaluation = p["evaluation"]
    if not evaluation:
        return []
    mine, results = evaluation["this_model"], evaluation["results"]
    lines = [
        "## Evaluation",
        "",
        f"From `{evaluation['source']}`" + (f"; this model is **{mine}**." if mine else "."),
        "",
    ]
    if isinstance(results, dict) and results and all(isinstance(v, dict) for v in results.values()):
        columns = sorted({k for v in results.values() for k in v})
        rows = [
            (f"**{name}**" if name == mine else name, *[m.get(c, "") for c in columns]) for name, m in results.items()
        ]
        return lines + _table(("model", *columns), rows) + [""]
    return lines + ["```json", json.dumps(results, indent=2, default=str), "```", ""]


def _card_result(p: dict[str, Any], repo_id: str) -> list[str]:
    if not p["training_result"]:
        return []
    return ["## Training result", "", *_table(("metric", "value"), list(p["training_result"].items())), ""]


def _card_stages(p: dict[str, Any], repo_id: str) -> list[str]:
    if not p["stages"]:
        return []
    rows = [(n, s["kind"], s["target"], (s["fingerprint"] or "")[:16]) for n, s in p["stages"].items()]
    return ["## Pipeline stages", "", *_table(("stage", "kind", "target", "fingerprint"), rows), ""]
