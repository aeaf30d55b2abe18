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
