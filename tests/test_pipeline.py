import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from align_distill import pipeline as pipeline_module
from align_distill import synthetic
from align_distill.errors import ConfigError
from align_distill.pipeline import Pipeline, PipelineError, run_pipeline_file

CALL = "tests.pipeline_stages"


def recipe(tmp_path: Path, plus: int = 1, input_file: Path | None = None) -> dict:
    first = {"value": 1, "name": "a"}
    if input_file is not None:
        first["note"] = str(input_file)
    return {
        "run_dir": str(tmp_path / "run"),
        "stages": [
            {"name": "first", "call": f"{CALL}:write_number", "config": first},
            {
                "name": "second",
                "call": f"{CALL}:add_from",
                "config": {"source": "${first}", "plus": plus, "name": "b"},
            },
        ],
    }


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().split() if log.exists() else []


def test_runs_in_order_and_skips_completed_stages(tmp_path):
    out = Pipeline.from_recipe(recipe(tmp_path)).run()
    assert (out["second"] / "value.txt").read_text() == "2"
    marker = json.loads((out["second"] / "stage.json").read_text())
    assert marker["config"]["source"] == str(tmp_path / "run" / "first") and marker["result"] == 2
    Pipeline.from_recipe(recipe(tmp_path)).run()
    assert calls(tmp_path) == ["a", "b"]


def test_changed_config_reruns_only_that_stage_and_downstream(tmp_path):
    Pipeline.from_recipe(recipe(tmp_path)).run()
    out = Pipeline.from_recipe(recipe(tmp_path, plus=5)).run()
    assert calls(tmp_path) == ["a", "b", "b"]
    assert (out["second"] / "value.txt").read_text() == "6"


def test_changed_input_file_reruns_downstream(tmp_path):
    data = tmp_path / "input.txt"
    data.write_text("v1")
    Pipeline.from_recipe(recipe(tmp_path, input_file=data)).run()
    data.write_text("v2")
    Pipeline.from_recipe(recipe(tmp_path, input_file=data)).run()
    assert calls(tmp_path) == ["a", "b", "a", "b"]


def test_from_stage_reruns_it_and_later_ones(tmp_path):
    Pipeline.from_recipe(recipe(tmp_path)).run()
    Pipeline.from_recipe(recipe(tmp_path)).run(from_stage="second")
    assert calls(tmp_path) == ["a", "b", "b"]
    with pytest.raises(PipelineError, match="unknown stage 'third'"):
        Pipeline.from_recipe(recipe(tmp_path)).run(from_stage="third")


def test_interrupted_stage_is_never_complete_and_is_redone_cleanly(tmp_path):
    failing = recipe(tmp_path)
    failing["stages"].append({"name": "third", "call": f"{CALL}:explode"})
    with pytest.raises(RuntimeError, match="on purpose"):
        Pipeline.from_recipe(failing).run()
    run = tmp_path / "run"
    assert not (run / "third").exists() and (run / ".third.partial" / "half-written.txt").exists()
    failing["stages"][-1] = {"name": "third", "call": f"{CALL}:write_number", "config": {"name": "c"}}
    Pipeline.from_recipe(failing).run()
    assert calls(tmp_path) == ["a", "b", "boom", "c"]
    assert not (run / ".third.partial").exists() and not (run / "third" / "half-written.txt").exists()


def test_recipe_errors_name_the_stage(tmp_path):
    bad = recipe(tmp_path)
    bad["stages"][0]["config"]["source"] = "${second}"
    with pytest.raises(PipelineError, match=r"stage `first`: references \$\{second\}, which is a later stage"):
        Pipeline.from_recipe(bad)
    bad = recipe(tmp_path)
    bad["stages"][1]["trian"] = "sft"
    with pytest.raises(PipelineError, match=r"stage `second`: unknown key `trian` \(did you mean `train`\?\)"):
        Pipeline.from_recipe(bad)
    bad = recipe(tmp_path)
    bad["stages"][1]["name"] = "first"
    with pytest.raises(PipelineError, match="duplicate stage names"):
        Pipeline.from_recipe(bad)
    with pytest.raises(PipelineError, match="run_dir"):
        Pipeline.from_recipe({"stages": []})


def test_train_stage_rejects_unknown_config_keys_and_bad_data_before_training(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    spec = {
        "run_dir": str(tmp_path / "run"),
        "stages": [
            {"name": "dpo", "train": "dpo", "config": {"model_name_or_path": "nowhere", "dataset_name": str(data)}}
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    from align_distill.data import DataValidationError

    with pytest.raises(DataValidationError, match=r"pairs.jsonl:row 1:column rejected: is identical to chosen"):
        run_pipeline_file(path)
    assert not (tmp_path / "run" / "dpo").exists()
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    spec["stages"][0]["config"]["learning_rat"] = 1e-3
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"recipe.yaml: line \d+: stage `dpo`: unknown key `learning_rat` for dpo"):
        run_pipeline_file(path)


# -- stage names and the paths the pipeline deletes -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["../victim", "/tmp/victim", "a/b", ".hidden", "", "..", "a b"])
def test_stage_names_must_be_plain_names(tmp_path, name):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    bad = recipe(tmp_path)
    bad["stages"][0]["name"] = name
    bad["stages"][1]["config"]["source"] = "1"
    with pytest.raises(PipelineError, match=r"stage #1: stage names must be plain names"):
        Pipeline.from_recipe(bad)
    assert (victim / "precious.txt").read_text() == "keep"


def test_pipeline_never_deletes_outside_run_dir(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    pipeline = Pipeline.from_recipe(recipe(tmp_path))
    (tmp_path / "run").mkdir()
    with pytest.raises(PipelineError, match="not inside the run folder"):
        pipeline._remove(outside)
    with pytest.raises(PipelineError, match="not inside the run folder"):
        pipeline._remove(tmp_path / "run")
    (tmp_path / "run" / "first").symlink_to(outside)  # a stage folder that points elsewhere is not followed
    with pytest.raises(PipelineError, match="not inside the run folder"):
        pipeline.run(from_stage="first")
    assert (outside / "precious.txt").read_text() == "keep"


def test_stage_killed_while_its_folder_is_deleted_is_not_complete(tmp_path, monkeypatch):
    Pipeline.from_recipe(recipe(tmp_path)).run()
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes every file but the marker, then the process "dies"
        for file in Path(path).rglob("*"):
            if file.is_file() and file.name != "stage.json":
                file.unlink()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        Pipeline.from_recipe(recipe(tmp_path)).run(from_stage="second")
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    out = Pipeline.from_recipe(recipe(tmp_path)).run()
    assert calls(tmp_path) == ["a", "b", "b"]  # `second` was redone, not taken as complete without its files
    assert (out["second"] / "value.txt").read_text() == "2"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["first", "second"]  # no trash left


# -- resuming a training stage from its last checkpoint --------------------------------------------------------------
def fake_train(monkeypatch, seen: list) -> None:
    """Replace the `train` runner (and its config check) by one that records the config it was given."""

    def run(stage, config, out):
        seen.append(dict(config))
        (out / "model.txt").write_text("trained")
        return {"ok": True}

    monkeypatch.setitem(pipeline_module.RUNNERS, "train", run)
    monkeypatch.setitem(pipeline_module.CHECKS, "train", lambda stage, config, out: None)


def train_recipe(tmp_path: Path, lr: float = 1e-3) -> dict:
    config = {"model_name_or_path": "m", "dataset_name": "${run_dir}/d.jsonl", "learning_rate": lr}
    return {"run_dir": str(tmp_path / "run"), "stages": [{"name": "student", "train": "sft", "config": config}]}


def crashed_partial(tmp_path: Path, fingerprint: str) -> Path:
    partial = tmp_path / "run" / ".student.partial"
    for step in (2, 4, 10):
        (partial / f"checkpoint-{step}").mkdir(parents=True)
        if step != 10:  # checkpoint-10 was cut short by the crash: the Trainer writes trainer_state.json last
            (partial / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (partial / ".fingerprint").write_text(fingerprint)
    return partial


def test_crashed_training_stage_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    seen: list = []
    fake_train(monkeypatch, seen)
    pipeline = Pipeline.from_recipe(train_recipe(tmp_path))
    partial = crashed_partial(tmp_path, pipeline.fingerprint(pipeline.stages[0]))
    pipeline.run()
    assert seen[0]["resume_from_checkpoint"] == str(partial / "checkpoint-4")
    assert (tmp_path / "run" / "student" / "checkpoint-4").is_dir()  # the checkpoints were kept, not recomputed


def test_changed_training_stage_starts_clean(tmp_path, monkeypatch, capsys):
    seen: list = []
    fake_train(monkeypatch, seen)
    old = Pipeline.from_recipe(train_recipe(tmp_path))
    crashed_partial(tmp_path, old.fingerprint(old.stages[0]))
    Pipeline.from_recipe(train_recipe(tmp_path, lr=5e-4)).run()
    assert "resume_from_checkpoint" not in seen[0]
    assert not (tmp_path / "run" / "student" / "checkpoint-4").exists()
    assert not (tmp_path / "run" / "student" / ".fingerprint").exists()


# -- why a stage runs, progress, and secrets -----------------------------------------------------------------------
def reasons(capsys) -> dict[str, str]:
    """{stage: the reason printed in its `running (...)` line} from the captured output."""
    found = {}
    for line in capsys.readouterr().out.splitlines():
        match = re.match(r"\[\d+/\d+\] (\w+): running \w+ \S+ \((.*)\)$", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def test_rerun_says_why(tmp_path, capsys):
    data = tmp_path / "input.txt"
    data.write_text("v1")
    Pipeline.from_recipe(recipe(tmp_path, input_file=data)).run()
    assert reasons(capsys) == {"first": "not run before", "second": "not run before"}
    Pipeline.from_recipe(recipe(tmp_path, plus=5, input_file=data)).run()
    assert reasons(capsys) == {"second": "config key `plus` changed"}
    data.write_text("v2")
    Pipeline.from_recipe(recipe(tmp_path, plus=5, input_file=data)).run()
    assert reasons(capsys) == {"first": f"input file {data} changed", "second": "upstream stage `first` changed"}
    Pipeline.from_recipe(recipe(tmp_path, plus=5, input_file=data)).run(from_stage="second")
    assert reasons(capsys) == {"second": "forced by --from"}
    changed = recipe(tmp_path, plus=5, input_file=data)
    changed["stages"][0]["config"]["extra"] = {"depth": 1}
    changed["stages"] = [{**changed["stages"][0], "call": f"{CALL}:keep"}]
    Pipeline.from_recipe(changed).run()
    assert reasons(capsys) == {
        "first": f"target changed ({CALL}:write_number → {CALL}:keep); config key `extra.depth` added"
    }


def test_progress_prints_a_stage_counter_and_elapsed_time(tmp_path, capsys):
    Pipeline.from_recipe(recipe(tmp_path)).run()
    out = capsys.readouterr().out
    assert re.search(r"^\[1/2\] first: running call \S+ \(not run before\)$", out, re.M)
    assert re.search(r"^\[2/2\] second: finished in \d+ s, \d+ s elapsed$", out, re.M)
    Pipeline.from_recipe(recipe(tmp_path)).run()
    assert re.search(r"^\[2/2\] second: done \(fingerprint \w+\), skipped$", capsys.readouterr().out, re.M)


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0 s"), (41, "41 s"), (130, "2 min 10 s"), (3725, "1 h 2 min")])
def test_durations_read_as_words(seconds, text):
    assert pipeline_module.duration(seconds) == text


def test_stage_record_never_holds_a_secret(tmp_path):
    token = "hf_" + "a1B2c3D4e5F6g7H8i9J0kLmN"
    spec = {
        "run_dir": str(tmp_path / "run"),
        "stages": [{"name": "push", "call": f"{CALL}:keep", "config": {"hub_token": token, "note": f"t={token}"}}],
    }
    out = Pipeline.from_recipe(spec).run()
    text = (out["push"] / "stage.json").read_text()
    assert token not in text and "<redacted>" in text
    Pipeline.from_recipe(spec).run()
    assert calls(tmp_path) == ["k"]  # the redacted record still marks the stage complete


def evaluate_recipe(tmp_path: Path, tiny_models: dict, eval_file: Path) -> dict:
    """Two prompts, the tiny student evaluated by a checker: an `evaluate` stage reading a YAML file plus keys."""
    prompts = tmp_path / "prompts.jsonl"
    texts = synthetic.evaluation_prompts("test", 0, 2)
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in texts))
    eval_file.write_text(
        "generation: {max_completion_length: 4, progress: false}\n"
        "checkers: {task: align_distill.evaluation.checkers:synthetic_task}\nbootstrap_resamples: 50\n"
    )
    return {
        "run_dir": str(tmp_path / "run"),
        "stages": [
            {"name": "first", "call": f"{CALL}:write_number", "config": {"value": 1, "name": "a"}},
            {
                "name": "scores",
                "evaluate": str(eval_file),
                "config": {"prompts": str(prompts), "models": {"student": str(tiny_models["student"])}},
            },
        ],
    }


def test_evaluate_stage_runs_once_and_reruns_when_its_file_changes(tmp_path, tiny_models, capsys):
    eval_file = tmp_path / "eval.yaml"
    raw = evaluate_recipe(tmp_path, tiny_models, eval_file)
    out = Pipeline.from_recipe(raw).run()
    scores = json.loads((out["scores"] / "eval.json").read_text())
    assert set(scores["student"]) == {"reward", "capability", "preference", "n"} and scores["student"]["n"] == 2
    assert (out["scores"] / "report.md").is_file() and (out["scores"] / "generations" / "student").is_dir()
    record = json.loads((out["scores"] / "stage.json").read_text())
    assert record["kind"] == "evaluate" and record["result"]["student"]["reward"]["n"] == 2
    Pipeline.from_recipe(raw).run()
    assert "scores: done" in capsys.readouterr().out
    eval_file.write_text(eval_file.read_text().replace("bootstrap_resamples: 50", "bootstrap_resamples: 60"))
    Pipeline.from_recipe(raw).run()
    assert f"input file {eval_file} changed" in capsys.readouterr().out


def test_evaluate_stage_keys_are_checked_before_the_first_stage(tmp_path, tiny_models):
    raw = evaluate_recipe(tmp_path, tiny_models, tmp_path / "eval.yaml")
    raw["stages"][1]["config"]["baseline"] = "teacher"
    with pytest.raises(ConfigError, match="stage `scores`.*baseline: 'teacher' is not one of the models"):
        Pipeline.from_recipe(raw).run()
    assert calls(tmp_path) == []  # nothing ran
