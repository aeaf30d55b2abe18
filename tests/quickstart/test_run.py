"""The quickstart end to end at toy size: every stage runs, the report and chart are written, a rerun skips."""

import json

import pytest

from align_distill.quickstart import build_pipeline, run_quickstart


@pytest.mark.slow
def test_quickstart_smoke_runs_every_stage_and_reuses_them(tmp_path, capsys):
    run_dir = tmp_path / "qs"
    results = run_quickstart(run_dir=run_dir, smoke=True, methods=["dpo"])
    assert {"teacher_sft (ref)", "teacher_dpo", "teacher_rev_dpo", "student_sft", "student_dpo"} <= set(results)
    for scores in results.values():
        assert 0.0 <= scores["reward"] <= 1.0 and scores["n"] == 8
    assert (run_dir / "report.md").read_text().count("| student_dpo |") == 1
    assert (run_dir / "reward.png").read_bytes()[:4] == b"\x89PNG"
    marker = json.loads((run_dir / "teacher_rev_dpo" / "stage.json").read_text())
    assert marker["config"]["reverse"] is True and marker["config"]["max_steps"] == 2
    capsys.readouterr()
    run_quickstart(run_dir=run_dir, smoke=True, methods=["dpo"])
    out = capsys.readouterr().out
    assert out.count("skipped") == len(build_pipeline(run_dir, methods=["dpo"], smoke=True).stages)


def test_unknown_quickstart_method_is_rejected(tmp_path):
    with pytest.raises(SystemExit, match="unknown methods"):
        build_pipeline(tmp_path, methods=["nope"])


@pytest.mark.slow
def test_quickstart_reports_reward_vs_steps_for_dpo_and_aligndistil(tmp_path):
    """With DPO and AlignDistil selected, a `convergence` stage retrains both measuring the reward at step 0 and at
    the last step (smoke: 2 steps); the report embeds the chart and the table. Training is deterministic on CPU, so
    the curve's last point is the evaluated stage model's reward."""
    run_dir = tmp_path / "qs"
    results = run_quickstart(run_dir=run_dir, smoke=True, methods=["dpo", "aligndistil"])
    curves = json.loads((run_dir / "convergence" / "curves.json").read_text())
    assert set(curves) == {"student_dpo", "aligndistil_off"}
    for points in curves.values():
        assert [p["step"] for p in points] == [0, 2]
        assert points[0]["reward"] == pytest.approx(results["student_sft"]["reward"])
    assert curves["student_dpo"][-1]["reward"] == pytest.approx(results["student_dpo"]["reward"])
    assert curves["aligndistil_off"][-1]["reward"] == pytest.approx(results["student_aligndistil"]["reward"])
    report = (run_dir / "report.md").read_text()
    assert "![reward vs steps](reward_vs_steps.png)" in report and "| student_dpo | " in report
    assert (run_dir / "reward_vs_steps.png").read_bytes()[:4] == b"\x89PNG"
    assert "convergence" not in [s.name for s in build_pipeline(run_dir, methods=["dpo"], smoke=True).stages]


def test_the_evaluate_stage_answers_exactly_as_the_synthetic_evaluation(tiny_models, tmp_path):
    """The quickstart's `evaluate` stage (the evaluate machinery: transformers backend through the `sample` store)
    gives token for token the answers of `synthetic.evaluate`'s greedy loop, hence the same scores: the published
    quickstart numbers did not change when the stage moved onto it."""
    from align_distill import synthetic
    from align_distill.models import load_model, load_tokenizer
    from align_distill.pipeline import Pipeline, Stage
    from align_distill.quickstart import evaluate_stage

    models = {"teacher": str(tiny_models["teacher"]), "student": str(tiny_models["student"])}
    prompts = Stage("test_prompts", "call", "align_distill.quickstart:write_test_prompts", {"seed": 3, "n": 70})
    Pipeline(tmp_path, [prompts, evaluate_stage(models, "${test_prompts}/prompts.jsonl")]).run()
    results = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    texts = synthetic.evaluation_prompts("test", 3, 70)
    scores = json.loads((tmp_path / "evaluate" / "eval.json").read_text())
    for label, path in models.items():
        model, tokenizer = load_model(path, dtype="float32"), load_tokenizer(path)
        expected = synthetic.generate_responses(model, tokenizer, texts)
        assert [row["answers"][label][0]["content"] for row in results["rows"]] == expected
        assert scores[label] == synthetic.evaluate(model, tokenizer, n=70, seed=3).as_dict()
