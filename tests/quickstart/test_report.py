"""The quickstart's report and chart: values on the bars, the legend outside them, and a smoke run says it is one
(the `smoke` flag reaches the evaluate stage's config only in smoke runs)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from align_distill.quickstart import build_pipeline  # noqa: E402
from align_distill.quickstart.report import plot_results, write_report  # noqa: E402

RESULTS = {
    "teacher_dpo": {"reward": 0.9, "capability": 0.81, "preference": 0.99, "n": 8},
    "student_sft": {"reward": 0.375, "capability": 0.235, "preference": 0.515, "n": 8},
    "student_dpo": {"reward": 0.4925, "capability": 0.02, "preference": 0.965, "n": 8},
}


def test_chart_labels_models_and_values_with_the_legend_outside():
    ax = plot_results(RESULTS).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(RESULTS)
    assert "ground-truth" in ax.get_ylabel() and "synthetic task" in ax.get_title()
    assert "smoke" not in ax.get_title().lower()
    values = [f"{r[c]:.2f}" for c in ("reward", "capability", "preference") for r in RESULTS.values()]
    assert [t.get_text() for t in ax.texts] == values
    assert ax.get_legend().get_bbox_to_anchor().x0 >= ax.get_window_extent().x1


def test_smoke_report_and_chart_say_smoke(tmp_path):
    write_report(tmp_path, RESULTS, {"student_dpo": "runs/x"}, smoke=True)
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# align-distill run report (smoke run)") and "scores mean nothing" in report
    assert (tmp_path / "reward.png").read_bytes()[:4] == b"\x89PNG"
    assert "SMOKE RUN" in plot_results(RESULTS, smoke=True).axes[0].get_title()
    write_report(tmp_path, RESULTS, {"student_dpo": "runs/x"})
    assert "smoke" not in (tmp_path / "report.md").read_text().lower()


def test_smoke_flag_reaches_only_a_smoke_runs_report_stage(tmp_path):
    def report_config(smoke: bool) -> dict:
        return next(
            s for s in build_pipeline(tmp_path, methods=["dpo"], smoke=smoke).stages if s.name == "report"
        ).config

    assert report_config(True)["smoke"] is True
    assert "smoke" not in report_config(False)  # a full run's report fingerprint is unchanged
