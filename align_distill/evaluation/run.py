"""`run_evaluation(config)`: answers → scores → summaries with intervals → results.json, eval.json, report.md, plots.

Every model answers through the `sample` job (`generations/<label>/`, an exactly-once store: an interrupted run
resumes, a finished one is reused), each judge comparison is a `rank` job (`judgements/<label>_vs_<baseline>/`),
reward-model scores are cached per model (`scores/`). A `.done` file next to each holds the digest of what made it
(model files, settings, prompts), so a rerun loads no model for work that is already done, and a changed model or
setting redoes exactly its own part.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from align_distill.data_gen import load_store
from align_distill.data_gen.config import RankConfig, SampleConfig
from align_distill.data_gen.jobs import run_rank, run_sample
from align_distill.data_gen.jobs.inputs import dataset_digest, load_inputs
from align_distill.data_gen.judges import Judge, RewardModelJudge, make_judge
from align_distill.errors import UserError
from align_distill.fingerprint import config_digest, model_fingerprint, path_digest, semantic_kwargs
from align_distill.models.merge import merge_adapter

from .checkers import Checker
from .config import EvaluateConfig, EvaluatedModel, load_evaluate_config
from .length_control import length_controlled_win_rate
from .pairwise import ORDERS, answer_length, combine, judgement_rows
from .report import write_outputs
from .statistics import mean_interval, paired_difference

logger = logging.getLogger("align_distill.evaluation")

RESULTS_FILE = "results.json"


class EvaluationError(UserError, RuntimeError):
    """An evaluation could not go on (a model that does not load, a judge that never answers in the format); what
    was finished is kept and a rerun resumes."""


def slug(label: str) -> str:
    """A folder name for a model label (`teacher (π_ref)` → `teacher_π_ref`)."""
    return re.sub(r"[^\w.-]+", "_", label, flags=re.UNICODE).strip("_") or "model"


def _write_json(path: Path, value: Any) -> None:
    """Atomic: a temporary name, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _once(folder: Path, digest: str, work: Callable[[], Any]) -> None:
    """Run `work` unless `<folder>.done` records `digest` (then its output in `folder` is complete and current)."""
    done = folder.with_name(folder.name + ".done")
    if done.is_file() and done.read_text().strip() == digest and folder.exists():
        return
    work()
    done.write_text(digest)


def as_evaluate_config(config: EvaluateConfig | dict[str, Any] | str | os.PathLike) -> EvaluateConfig:
    if isinstance(config, EvaluateConfig):
        config.check()
        return config
    if isinstance(config, dict):
        return load_evaluate_config(None, config)
    return load_evaluate_config(os.fspath(config), None)


# -- the models' answers --------------------------------------------------------------------------------------------
def model_source(label: str, spec: EvaluatedModel, out: Path) -> str:
    """The folder (or id, or served name) to generate with: a LoRA adapter is merged into its base once."""
    path = Path(spec.model).expanduser()
    if spec.backend == "openai" or not (path / "adapter_config.json").is_file():
        return spec.model
    merged = out / "merged" / slug(label)
    digest = config_digest({"adapter": path_digest(path), "base": spec.base})
    _once(merged, digest, lambda: _merge(path, merged, spec.base))
    return str(merged)


def _merge(adapter: Path, merged: Path, base: str | None) -> None:
    if merged.exists():  # a merge of an older adapter or base
        shutil.rmtree(merged)
    merge_adapter(adapter, merged, base=base)


def generate_answers(config: EvaluateConfig, label: str, spec: EvaluatedModel, prompts_digest: str) -> Path:
    """The `sample` store of one model's answers (resumed or reused)."""
    out = Path(config.output_dir)
    store = out / "generations" / slug(label)
    model = model_source(label, spec, out)
    g = config.generation
    job = SampleConfig(
        input=config.prompts, split=config.split, limit=config.limit, output_dir=str(store),
        shard_size=g.shard_size, progress=g.progress, overwrite=True,
        model=model, backend=spec.backend, tokenizer=spec.tokenizer, revision=spec.revision,
        backend_kwargs=dict(spec.backend_kwargs), n=1, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
        max_completion_length=g.max_completion_length, stop=list(g.stop), seed=g.seed,
    )  # fmt: skip
    digest = config_digest(
        {
            "model": model_fingerprint(model, spec.revision),
            "backend": spec.backend,
            "backend_kwargs": semantic_kwargs(spec.backend_kwargs),
            "tokenizer": spec.tokenizer,
            "generation": {k: v for k, v in vars(g).items() if k != "progress"},
            "prompts": prompts_digest,
        }
    )
    _once(store, digest, lambda: run_sample(job))
    return store


def _answers(store: Path) -> dict[str, dict[str, Any]]:
    """id → the store row (failed rows skipped)."""
    return {row["id"]: row for row in load_store(store).to_list()}


# -- scorers --------------------------------------------------------------------------------------------------------
class _LazyJudge:
    """The pairwise judge, built on first use (a rerun with every comparison done loads no judge)."""

    def __init__(self, spec: Any):
        self.spec, self.judge = spec, None

    def get(self) -> Judge:
        if self.judge is None:
            try:
                self.judge = make_judge(self.spec)
            except (ConnectionError, OSError, ValueError) as error:
                raise EvaluationError(f"pairwise_judge: {error}") from None
        return self.judge

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()


def judge_answers(
    config: EvaluateConfig, label: str, prompts: list[dict], answers: dict, judge: _LazyJudge
) -> dict[str, dict[str, Any]]:
    """id → the prompt's two judged rows, keyed by order (`model_first`, `baseline_first`)."""
    baseline = config.baseline
    assert baseline is not None
    name = f"{slug(label)}_vs_{slug(baseline)}"
    folder = Path(config.output_dir) / "judgements"
    rows = judgement_rows(
        prompts,
        {k: r["completion"] for k, r in answers[label].items()},
        {k: r["completion"] for k, r in answers[baseline].items()},
    )
    if not rows:
        return {}
    pairs_file = folder / f"{name}.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = pairs_file.with_name(f".{pairs_file.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, pairs_file)
    store = folder / name
    spec = config.pairwise_judge
    identity = {k: v for k, v in vars(spec).items() if k not in ("backend_kwargs", "model")}
    digest = config_digest(
        {
            "judge": identity,
            "model": model_fingerprint(spec.model, spec.revision) if spec.model else None,
            "backend_kwargs": semantic_kwargs(spec.backend_kwargs),
            "pairs": path_digest(pairs_file),
        }
    )
    job = RankConfig(input=str(pairs_file), output_dir=str(store), judge=spec, overwrite=True, progress=False)
    try:
        _once(store, digest, lambda: run_rank(job, judge=judge.get()))
    except EvaluationError:
        raise
    except (OSError, RuntimeError) as error:  # the judge's server stopped answering, a store error
        raise EvaluationError(
            f"pairwise_judge on `{label}` vs `{baseline}`: {_one_line(error)} — the verdicts so far are kept in "
            f"{store}; a rerun resumes"
        ) from error
    judged: dict[str, dict[str, Any]] = {}
    for row in load_store(store).to_list():
        prompt_id, _, order = row["id"].rpartition("/")
        judged.setdefault(prompt_id, {})[order] = row
    return judged


def reward_model_scores(config: EvaluateConfig, label: str, answers: dict) -> dict[str, float]:
    """id → the reward model's score of this model's answer, cached in `scores/reward_model/<label>.json`."""
    spec = config.reward_model
    path = Path(config.output_dir) / "scores" / "reward_model" / f"{slug(label)}.json"
    ids = sorted(answers)
    digest = config_digest(
        {
            "reward_model": vars(spec) | {"model": model_fingerprint(spec.model, spec.revision)},
            "answers": [(k, answers[k]["prompt"], answers[k]["completion"]) for k in ids],
        }
    )
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("digest") == digest:
            return cached["scores"]
    try:
        scorer = RewardModelJudge(
            spec.model, spec.tokenizer, batch_size=spec.batch_size, device=spec.device, dtype=spec.dtype,
            revision=spec.revision, max_length=spec.max_length,
        )  # fmt: skip
    except (OSError, ValueError) as error:
        raise EvaluationError(f"reward_model: {error}") from None
    try:
        values = scorer.score([answers[k]["prompt"] for k in ids], [answers[k]["completion"] for k in ids])
    finally:
        scorer.close()
    scores = dict(zip(ids, values))
    _write_json(path, {"digest": digest, "scores": scores})
    return scores


# -- the run ---------------------------------------------------------------------------------------------------------
def run_evaluation(config: EvaluateConfig | dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """Evaluate every model of `config` (see the module docstring); returns the summaries written to results.json."""
    config = as_evaluate_config(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_inputs(config.prompts, "prompt", config.split, config.limit)
    prompts = dataset.to_list()
    digest = dataset_digest(dataset)

    answers: dict[str, dict[str, dict[str, Any]]] = {}
    for label, spec in config.models.items():
        try:
            answers[label] = _answers(generate_answers(config, label, spec, digest))
        except (UserError, OSError, ValueError, RuntimeError) as error:  # a model that does not load or answer
            done = ", ".join(answers) or "none"
            raise EvaluationError(
                f"models.{label} ({spec.model}): {_one_line(error)} — answers already made (models: {done}) are kept "
                f"in {out / 'generations'}; a rerun resumes"
            ) from error

    scores: dict[str, dict[str, dict[str, float]]] = {label: {} for label in answers}  # label → id → metric → value
    checkers = [Checker(name, spec) for name, spec in config.checkers.items()]
    for label, rows in answers.items():
        for key, row in rows.items():
            where = f"model `{label}`, prompt id {key}"
            for checker in checkers:
                scores[label].setdefault(key, {}).update(checker(row["prompt"], row["completion"], row, where))
    if config.reward_model is not None:
        for label, rows in answers.items():
            for key, value in reward_model_scores(config, label, rows).items():
                scores[label].setdefault(key, {})["reward_model"] = value

    verdicts: dict[str, dict[str, Any]] = {}
    if config.pairwise_judge is not None:
        judge = _LazyJudge(config.pairwise_judge)
        try:
            for label in answers:
                if label != config.baseline:
                    judged = judge_answers(config, label, prompts, answers, judge)
                    verdicts[label] = {k: combine(v.get(ORDERS[0]), v.get(ORDERS[1])) for k, v in judged.items()}
        finally:
            judge.close()

    results = summarize(config, prompts, answers, scores, verdicts)
    write_outputs(out, results)
    _check_judge(config, results)
    return results


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _check_judge(config: EvaluateConfig, results: dict[str, Any]) -> None:
    """A judge none of whose verdicts could be read gives no win-rate: an error (after results.json is written)."""
    for label, summary in results["models"].items():
        judge = summary.get("judge")
        if judge and judge["judged"] == 0 and judge["unparsable"] > 0:
            raise EvaluationError(
                f"pairwise_judge: none of the {judge['unparsable']} verdicts on `{label}` vs `{config.baseline}` "
                f"ended with a valid `Ranking: [i] > [j]` line (e.g. {judge['example_error']}); check the judge model "
                f"and its instruction. The answers and the judge's raw replies are kept in {config.output_dir}"
            )


def summarize(
    config: EvaluateConfig,
    prompts: list[dict[str, Any]],
    answers: dict[str, dict[str, dict[str, Any]]],
    scores: dict[str, dict[str, dict[str, float]]],
    verdicts: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Per-prompt rows and per-model summaries with bootstrap intervals (paired by prompt against the baseline)."""
    resamples, seed = config.bootstrap_resamples, config.bootstrap_seed
    models: dict[str, Any] = {}
    for label in answers:
        by_metric: dict[str, dict[str, float]] = {}
        for key in (p["id"] for p in prompts):
            for metric, value in scores[label].get(key, {}).items():
                by_metric.setdefault(metric, {})[key] = value
        summary: dict[str, Any] = {
            "answered": len(answers[label]),
            "prompts": len(prompts),
            "mean_length": sum(answer_length(r["completion"]) for r in answers[label].values())
            / max(len(answers[label]), 1),
            "metrics": {m: mean_interval(list(v.values()), resamples, seed).as_dict() for m, v in by_metric.items()},
        }
        if config.baseline is not None and label != config.baseline:
            base_scores: dict[str, dict[str, float]] = {}
            for key, values in scores[config.baseline].items():
                for metric, value in values.items():
                    base_scores.setdefault(metric, {})[key] = value
            summary["versus_baseline"] = {
                m: paired_difference(v, base_scores[m], resamples, seed).as_dict()
                for m, v in by_metric.items()
                if m in base_scores and set(v) & set(base_scores[m])
            }
        if label in verdicts:
            summary["judge"] = _judge_summary(config, label, answers, verdicts[label])
        models[label] = summary
    rows = []
    for prompt in prompts:
        key = prompt["id"]
        row: dict[str, Any] = {"id": key, "prompt": prompt["prompt"], "answers": {}, "scores": {}, "judge": {}}
        for label in answers:
            if key in answers[label]:
                row["answers"][label] = answers[label][key]["completion"]
                row["scores"][label] = scores[label].get(key, {})
            verdict = verdicts.get(label, {}).get(key)
            if verdict is not None:
                row["judge"][label] = vars(verdict)
        rows.append(row)
    return {
        "prompts": config.prompts,
        "baseline": config.baseline,
        "scorers": {
            "pairwise_judge": _judge_identity(config),
            "reward_model": config.reward_model.model if config.reward_model else None,
            "checkers": dict(config.checkers),
        },
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95},
        "models": models,
        "rows": rows,
    }


def _judge_identity(config: EvaluateConfig) -> dict[str, Any] | None:
    spec = config.pairwise_judge
    if spec is None:
        return None
    return {"kind": spec.kind, "model": spec.model or spec.function, "backend": spec.backend}


def _judge_summary(config: EvaluateConfig, label: str, answers: dict, verdicts: dict[str, Any]) -> dict[str, Any]:
    resamples, seed = config.bootstrap_resamples, config.bootstrap_seed
    read = {k: v for k, v in verdicts.items() if v.preference is not None}
    preferences = [v.preference for v in read.values()]
    summary: dict[str, Any] = {
        "judged": len(read),
        "wins": sum(p == 1.0 for p in preferences),
        "ties": sum(p == 0.5 for p in preferences),
        "losses": sum(p == 0.0 for p in preferences),
        "unparsable": len(verdicts) - len(read),
        "example_error": next((v.error for v in verdicts.values() if v.error), None),
    }
    if preferences:
        summary["win_rate"] = mean_interval(preferences, resamples, seed).as_dict()
        differences = [
            answer_length(answers[label][k]["completion"]) - answer_length(answers[config.baseline][k]["completion"])
            for k in read
        ]
        summary["lc_win_rate"] = length_controlled_win_rate(preferences, differences, resamples, seed).as_dict()
    return summary
