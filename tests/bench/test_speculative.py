"""bench/speculative.py's stages, statistics and its section of docs/results.md, on made-up rows."""

from pathlib import Path

from bench import render_results
from bench import speculative as bench


def _rows():
    rows = []
    for seed in range(4):
        for i, method in enumerate(bench.METHODS):
            alpha = 0.6 + 0.01 * i + (0.0 if method != "kd_tvd" else (-0.03, 0.02, -0.02, 0.03)[seed]) + 0.001 * seed
            rows.append(
                {
                    "seed": seed,
                    "method": method,
                    "alpha_target_text": alpha,
                    "alpha_draft_text": alpha - 0.01,
                    "block_efficiency": {"4": (1 - alpha**5) / (1 - alpha)},
                    "sampler": {"acceptance": alpha, "block_efficiency": 2.5, "speedup": 0.8},
                }
            )
    return rows


def test_every_draft_trains_the_same_steps_from_the_sft_student():
    from align_distill.quickstart.stages import STUDENT_STEPS

    stages = bench.draft_stages(0, Path("samples.jsonl"))
    assert set(stages) == set(bench.METHODS) and stages["draft_base"] == []
    for method in bench.METHODS[1:]:
        (stage,) = stages[method]
        assert stage.config["max_steps"] == STUDENT_STEPS and stage.config["model_name_or_path"] == "${student_sft}"
    assert stages["kd_tvdpp"][0].config["lmbda"] == 1.0 and stages["kd_tvdpp_target"][0].config["lmbda"] == 0.0
    assert stages["kd_tvdpp_target"][0].config["dataset_name"] == "samples.jsonl"


def test_comparisons_and_section_state_only_what_the_intervals_support():
    rows = _rows()
    record = {
        "command": "python -m bench.speculative",
        "seeds": [0, 1, 2, 3],
        "wall_s": 1,
        "summary": bench.summary(rows),
        "comparisons": bench.comparisons(rows),
    }
    by_pair = {(c["method"], c["baseline"], c["metric"]): c for c in record["comparisons"]}
    assert by_pair["sft_target", "draft_base", "alpha_target_text"]["verdict"] == "higher"
    # kd_tvd's per-seed offsets (−.03, +.02, −.02, +.03) make its gap to kd_tvdpp change sign: the interval covers 0
    assert by_pair["kd_tvdpp", "kd_tvd", "alpha_target_text"]["verdict"] == "no difference"
    text = "\n".join(render_results.speculative_section(record))
    pair = "SFT on target samples − draft before distillation (SFT student)"
    assert f"| {pair} | +0.010 [+0.010, +0.010] | 4/0 of 4 |" in text
    assert "no difference (kd TVD++ ≈ kd TVD)" in text
