import json
from pathlib import Path

import pytest
import yaml

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
