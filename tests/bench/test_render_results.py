"""docs/results.md and the README's results tables are rendered from the committed JSON, never edited by hand."""

from bench import render_results
from bench.stats import paired_difference


def test_committed_pages_equal_what_the_json_renders():
    for path, text in render_results.render_all().items():
        assert path.read_text() == text, f"{path} is stale: run `python -m bench.render_results`"


def _record():
    runs = []
    for seed in range(4):
        runs.append(
            {
                "seed": seed,
                "method": "teacher_dpo",
                "sft_steps": None,
                "base": True,
                **{f"test_{m}": 0.9 for m in render_results.METRICS},
            }
        )
        runs.append(
            {
                "seed": seed,
                "method": "student_sft",
                "sft_steps": 200,
                "base": True,
                **{f"test_{m}": 0.4 for m in render_results.METRICS},
            }
        )
        adpa = 0.5 + 0.01 * seed + (-0.02, 0.03, -0.01, 0.02)[seed]
        for method, value in (("dpo", 0.5 + 0.01 * seed), ("dckd", 0.6 + 0.01 * seed), ("adpa", adpa)):
            runs.append(
                {
                    "seed": seed,
                    "method": method,
                    "sft_steps": 200,
                    "selected": True,
                    "lr_factor": 1.0,
                    "learning_rates": [1e-3],
                    "optimizer_steps": 60,
                    **{f"test_{m}": value for m in render_results.METRICS},
                }
            )
    comparisons = []
    for method, baseline in (("dckd", "dpo"), ("adpa", "dpo")):
        for metric in render_results.METRICS:
            values = {
                name: {r["seed"]: r[f"test_{metric}"] for r in runs if r["method"] == name}
                for name in (method, baseline)
            }
            difference = paired_difference(values[method], values[baseline]).as_dict()
            comparisons.append(
                {"method": method, "baseline": baseline, "sft_steps": 200, "metric": metric, **difference}
            )
    return {
        "family": "adpa",
        "command": "python -m bench.reproduce adpa",
        "protocol": {
            "seeds": [0, 1, 2, 3],
            "tuning_seeds": [0],
            "sft_budgets": [200],
            "lr_factors": [0.25, 1, 4],
            "evaluation_prompts": {"validation": 200, "test": 500},
            "bootstrap_resamples": 10000,
        },
        "selected_lr_factors": {m: {"200": 1.0} for m in ("dpo", "dckd", "adpa")},
        "runs": runs,
        "comparisons": comparisons,
    }


def test_sections_state_only_what_the_intervals_support():
    text = "\n".join(render_results.family_section(_record()))
    # DCKD is 0.1 above DPO on every seed: a difference; ADPA's gaps are -.02, +.03, -.01, +.02: the interval covers 0
    assert "| DCKD − student DPO | +0.100 [+0.100, +0.100] | 4/0 of 4 |" in text
    assert "DCKD higher in reward" in text
    assert "| ADPA − student DPO | +0.005 [" in text and "| 2/2 of 4 |" in text
    assert "no difference in reward (ADPA ≈ student DPO)" in text
    assert "| DCKD | 0.615 ± 0.013 |" in text  # mean ± sd over the 4 seeds


def test_headline_lists_every_family_comparison():
    record = _record()
    records = {family: {**record, "family": family} for family in render_results.FAMILIES}
    lines = render_results.headline_block(records)
    assert sum("DCKD − student DPO" in line for line in lines) == len(render_results.FAMILIES)
    assert lines[0].startswith("Over 4 seeds, student SFT budget 200 steps")
