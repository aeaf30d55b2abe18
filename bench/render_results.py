"""Render docs/results.md and the README's results blocks from the committed reproduction JSON files.

    python -m bench.render_results            # rewrite docs/results.md and the README blocks
    python -m bench.render_results --check    # exit 1 if a committed file differs from what the JSON gives

Nothing here measures anything: every number printed comes from `bench/reproductions/<family>.json`, written by
`python -m bench.reproduce`. The sentences that say what a comparison shows are generated from its interval (a
difference is claimed only when the bootstrap 95 % interval excludes 0), so they cannot drift from the data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "reproductions"
RESULTS_MD = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
FAMILIES = ("adpa", "aligndistil", "mod", "cyclealign", "kd")

TITLES = {
    "adpa": "DCKD, ADPA, ADPA+",
    "aligndistil": "AlignDistil",
    "mod": "LLaVA-MoD (text task)",
    "cyclealign": "CycleAlign",
    "kd": "KD: the divergence family, and TRL's DistillationTrainer",
}
CLAIMS = {
    "adpa": "The paper's claim: DCKD and ADPA both improve a small student's alignment, ADPA beats DCKD, and ADPA+ "
    "(DCKD, then ADPA) is best. Both methods carry an SFT term on the pairs' chosen answers, so `sft_chosen` (that "
    "term alone, same trainer, data, steps and learning-rate grid) separates the teacher's token-level signal from "
    "\"more SFT on good answers\". The control is exactly DCKD's run with the teacher terms off; ADPA's SFT term "
    "sees the 512 pairs its rollout covers (more epochs over fewer rows), so for ADPA the control matches steps, "
    "batch size and grid but not the rows.",
    "aligndistil": "The paper's claim: token-level distillation from the DPO teacher contrasted with a reverse-DPO "
    "teacher aligns a student better than sequence-level preference optimisation. Off-policy trains on the "
    "pairs' chosen responses, on-policy on the student's own samples.",
    "mod": "The paper's claim: preference distillation with the aligned teacher as the DPO reference "
    "(`teacher_ref`) beats plain DPO, and the whole chain (mimic distillation d2d → upcycle to 4 experts → d2s → pd) "
    "gives the best student.",
    "cyclealign": "The paper's claim: iterating black-box ranking (here a noisy oracle: the true reward + noise and "
    "5 % unparsable answers), white-box ranking, agreement and a ranking loss aligns the white box. Candidates are "
    "the student's samples plus each prompt's chosen/rejected pair.",
    "kd": "General distillation from the aligned (DPO) teacher, on-policy (every batch is the student's own samples "
    "of the rollout prompts, GKD's λ = 1) with each divergence of `kd_loss`, side by side with TRL's "
    "`DistillationTrainer` run through its public API on the same student, teacher, prompts, steps, batch and "
    "learning-rate grid (its generalized JSD: β = 0 forward KL, 0.5 JSD, 1 reverse KL). Reported at the quickstart's "
    "student SFT budget only.",
}
LABELS = {
    "dpo": "student DPO",
    "sft_chosen": "SFT on chosen (control)",
    "dckd": "DCKD",
    "adpa": "ADPA",
    "adpa_plus": "ADPA+",
    "aligndistil": "AlignDistil off-policy",
    "aligndistil_on": "AlignDistil on-policy",
    "teacher_ref": "teacher-as-reference DPO",
    "mod": "LLaVA-MoD chain",
    "cyclealign": "CycleAlign",
    "teacher_sft": "teacher SFT (reference)",
    "teacher_dpo": "teacher DPO (aligned)",
    "teacher_rev_dpo": "teacher reverse DPO",
    "student_sft": "student SFT (the start)",
    "kd_forward_kl": "kd forward KL",
    "kd_reverse_kl": "kd reverse KL",
    "kd_jsd": "kd JSD (β 0.5)",
    "kd_skew_kl": "kd skew forward KL (α 0.1)",
    "kd_akl": "kd AKL (μ 0.5)",
    "kd_taid": "kd TAID",
    "trl_forward_kl": "TRL DistillationTrainer forward KL",
    "trl_jsd": "TRL DistillationTrainer JSD (β 0.5)",
    "trl_reverse_kl": "TRL DistillationTrainer reverse KL",
    # speculative decoding drafts (bench/speculative.py)
    "draft_base": "draft before distillation (SFT student)",
    "sft_target": "SFT on target samples",
    "kd_tvd": "kd TVD",
    "kd_tvdpp": "kd TVD++",
    "kd_forward_kl_target": "kd forward KL on target samples",
    "kd_tvdpp_target": "kd TVD++ on target samples (Goel et al.)",
}
METRICS = ("reward", "capability", "preference")
BLOCKS = ("quickstart-table", "headline")


def load(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def label(method: str) -> str:
    return LABELS.get(method, method)


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _interval(row: dict) -> str:
    return f"{_signed(row['mean'])} [{_signed(row['low'])}, {_signed(row['high'])}]"


def models_table(record: dict, steps: int) -> list[str]:
    """Per model at one SFT budget: test-split mean ± sd over seeds, the kept learning rate and the step budget."""
    runs = record["runs"]
    lines = [
        "| model | test reward | capability | preference rate | learning rate (kept) | optimizer steps | seeds |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    bases = [r for r in runs if r.get("base") and r["method"] != "student_sft"]
    for name in dict.fromkeys(r["method"] for r in bases):
        rows = [r for r in bases if r["method"] == name]
        cells = [_mean_sd([r[f"test_{m}"] for r in rows]) for m in METRICS]
        lines.append(f"| {label(name)} | {' | '.join(cells)} | | | {len(rows)} |")
    start = [r for r in runs if r.get("base") and r["method"] == "student_sft" and r["sft_steps"] == steps]
    cells = [_mean_sd([r[f"test_{m}"] for r in start]) for m in METRICS]
    lines.append(f"| {label('student_sft')}, {steps} steps | {' | '.join(cells)} | | {steps} | {len(start)} |")
    for method in dict.fromkeys(r["method"] for r in runs if not r.get("base")):
        rows = [r for r in runs if r["method"] == method and r["sft_steps"] == steps and r.get("selected")]
        cells = [_mean_sd([r[f"test_{m}"] for r in rows]) for m in METRICS]
        rates = " → ".join(f"{lr:.2g}" for lr in rows[0]["learning_rates"])
        factor = record["selected_lr_factors"][method][str(steps)]
        grid = record["protocol"]["lr_factors"]
        edge = ", edge" if factor in (min(grid), max(grid)) else ""
        steps_taken = sorted({r["optimizer_steps"] for r in rows})
        budget = str(steps_taken[0]) if len(steps_taken) == 1 else f"{steps_taken[0]}–{steps_taken[-1]}"
        lines.append(
            f"| {label(method)} | {' | '.join(cells)} | {rates} (×{factor:g}{edge}) | {budget} | {len(rows)} |"
        )
    return lines


def comparison_table(record: dict, steps: int) -> list[str]:
    lines = [
        "| method − baseline | reward Δ [95 % CI] | seeds +/− | capability Δ [95 % CI] | preference Δ [95 % CI] | "
        "what the interval supports |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    rows = [c for c in record["comparisons"] if c["sft_steps"] == steps]
    for method, baseline in dict.fromkeys((c["method"], c["baseline"]) for c in rows):
        by_metric = {c["metric"]: c for c in rows if c["method"] == method and c["baseline"] == baseline}
        reward = by_metric["reward"]
        lines.append(
            f"| {label(method)} − {label(baseline)} | {_interval(reward)} | {reward['positive']}/{reward['negative']} "
            f"of {reward['seeds']} | {_interval(by_metric['capability'])} | {_interval(by_metric['preference'])} | "
            f"{_verdict(reward, method, baseline)} |"
        )
    return lines


def _verdict(row: dict, method: str, baseline: str) -> str:
    if row["verdict"] == "no difference":
        return f"no difference in reward ({label(method)} ≈ {label(baseline)})"
    return f"{label(method)} {row['verdict']} in reward"


def family_section(record: dict) -> list[str]:
    family = record["family"]
    protocol = record["protocol"]
    lines = [
        f"## {TITLES[family]}",
        "",
        f"File: [bench/reproductions/{family}.json](../bench/reproductions/{family}.json) (command: "
        f"`{record['command']}`; {len(protocol['seeds'])} seeds, learning rates tuned on seeds "
        f"{', '.join(map(str, protocol['tuning_seeds']))}).",
        "",
        CLAIMS[family],
        "",
    ]
    if "selected_divergence" in record:
        chosen = record["selected_divergence"]
        scores = ", ".join(f"{label(m)} {v:.3f}" for m, v in chosen["validation_reward"].items())
        lines += [
            f"The divergence with the best mean validation reward on the tuning seeds, {label(chosen['method'])}, is "
            f"the quickstart's `kd` student (validation reward: {scores}).",
            "",
        ]
    for steps in protocol["sft_budgets"]:
        lines += [f"### Student SFT budget {steps} steps", "", *models_table(record, steps), ""]
        lines += [
            "“edge”: the kept learning rate is the smallest or largest of the grid, so a wider grid might do better "
            "for that method.",
            "",
            "Paired over seeds (test split):",
            "",
            *comparison_table(record, steps),
            "",
        ]
    return lines


def protocol_section(record: dict) -> list[str]:
    p = record["protocol"]
    sizes = p["evaluation_prompts"]
    factors = ", ".join(f"×{f:g}" for f in p["lr_factors"])
    return [
        "## Protocol",
        "",
        "- **Task.** The quickstart's synthetic task ([quickstart](quickstart.md)): a prompt asks to reverse or sort "
        "3–6 letters; reward = 0.5 · capability (the exact answer) + 0.5 · preference (the polite `sure,` marker, "
        "which only the preference pairs teach). Each seed builds its own tiny teacher pair (SFT → DPO, reverse DPO), "
        "SFT student and data.",
        f"- **Splits.** Every prompt string belongs to one split by a hash of the string "
        f"(`align_distill.synthetic.task_splits(seed)`), so validation and test prompts never occur in any training, "
        f"pair or SFT file (a test checks every seed). Learning rates are chosen on the validation split "
        f"({sizes['validation']} prompts per seed); every number below is on the test split ({sizes['test']} prompts "
        f"per seed, greedy decoding).",
        f"- **Matched budgets.** Every student method trains the same number of optimizer steps from the same SFT "
        f"student (chains split them: ADPA+ is DCKD then ADPA, LLaVA-MoD is d2d, d2s, then pd; CycleAlign's count "
        f"depends on how many prompts its black box ranks and is shown as measured). Both student SFT budgets "
        f"({' and '.join(map(str, p['sft_budgets']))} steps) are reported, since conclusions can change with them.",
        f"- **Matched tuning.** Every method, baselines included, gets the same grid: its centre learning rate "
        f"{factors}. On seeds {', '.join(map(str, p['tuning_seeds']))} all three run; the factor with the best mean "
        f"validation reward is kept per method and SFT budget, and the other seeds run only that one.",
        "- **Controls.** `student DPO` (the student's own DPO, tuned like every method) and `SFT on chosen` (DCKD's "
        "trainer with both KL weights 0: DCKD's and ADPA's SFT term alone on the same data and steps).",
        f"- **Statistics.** A comparison is paired by seed (same SFT student and data): the mean difference over "
        f"{len(p['seeds'])} seeds with a percentile bootstrap 95 % interval ({p['bootstrap_resamples']:,} resamples) "
        f"and the number of seeds on each side. A difference is claimed only when the interval excludes 0. Ten seeds "
        f"because one seed of the whole grid takes minutes on a CPU and the seed-to-seed spread is large (each seed "
        f"is a different tiny model); the intervals show what that buys.",
        "",
    ]


def wall_time_line(records: dict[str, dict]) -> str:
    """How long the runs behind this page took (each JSON records its command's wall time)."""
    by_command: dict[str, int] = {}
    for record in records.values():
        by_command[record["command"]] = record["wall_s"]
    runs = "; ".join(f"`{command}` {seconds / 60:.0f} min" for command, seconds in by_command.items())
    return f"Wall time of the runs behind this page, 2 CPU cores, 2 workers: {runs}."


def quickstart_table(record: dict) -> list[str]:
    lines = ["| model | reward | capability | preference rate |", "| --- | ---: | ---: | ---: |"]
    for row in record["runs"]:
        lines.append(
            f"| {row['method']} | {row['test_reward']:.3f} | {row['test_capability']:.3f} | "
            f"{row['test_preference']:.3f} |"
        )
    return lines


def quickstart_block(record: dict, comparison: str = "[docs/results.md](docs/results.md)") -> list[str]:
    n = record["runs"][0]["test_n"]
    return [
        f"What it printed: **one seed** (seed {record['seed']}), on that seed's test split ({n} prompts that no "
        f"training file contains), every student method given {record['student_steps']} optimizer steps. One seed "
        "says whether the wiring works, not which method is better; the comparison over seeds with matched "
        f"baselines and intervals is in {comparison}.",
        "",
        *quickstart_table(record),
    ]


def headline_block(records: dict[str, dict]) -> list[str]:
    """The README's summary: each family's comparisons in reward at the quickstart's SFT budget."""
    lines = [
        "| comparison (reward, test split) | Δ [95 % CI] | seeds +/− | what the interval supports |",
        "| --- | ---: | ---: | --- |",
    ]
    for family in FAMILIES:
        record = records[family]
        steps = record["protocol"]["sft_budgets"][0]
        for row in record["comparisons"]:
            if row["sft_steps"] != steps or row["metric"] != "reward":
                continue
            lines.append(
                f"| {label(row['method'])} − {label(row['baseline'])} | {_interval(row)} | "
                f"{row['positive']}/{row['negative']} of {row['seeds']} | "
                f"{_verdict(row, row['method'], row['baseline'])} |"
            )
    seeds = len(records[FAMILIES[0]]["protocol"]["seeds"])
    steps = records[FAMILIES[0]]["protocol"]["sft_budgets"][0]
    return [
        f"Over {seeds} seeds, student SFT budget {steps} steps, each method against its matched baseline "
        f"(same SFT student, data, optimizer steps and learning-rate grid); the other budget and every metric are in "
        f"[docs/results.md](docs/results.md):",
        "",
        *lines,
    ]


def render_results_page(records: dict[str, dict], quickstart: dict, speculative: dict | None = None) -> str:
    first = records[FAMILIES[0]]
    lines = [
        "# Results",
        "",
        "<!-- Generated by `python -m bench.render_results` from bench/reproductions/*.json; do not edit by hand. -->",
        "",
        "Every number on this page is rendered from a committed JSON file under `bench/reproductions/` that "
        "`python -m bench.reproduce all` (or `make reproduce`) wrote: per-seed rows, the exact stage configs and the "
        "package versions. A test re-renders this page and fails if it differs from the files. Results are for "
        "tiny models on a synthetic task with a known reward: they test the methods' wiring and their claims at "
        "toy scale, not at the papers' scale.",
        "",
        *protocol_section(first),
        wall_time_line(records),
        "",
    ]
    for family in FAMILIES:
        lines += family_section(records[family])
    if speculative is not None:
        lines += speculative_section(speculative)
    lines += [
        "## The quickstart's one-seed table",
        "",
        f"File: [bench/reproductions/quickstart.json](../bench/reproductions/quickstart.json) (command: "
        f"`{quickstart['command']}`).",
        "",
        *quickstart_block(quickstart, comparison="the sections above")[:1],
        "",
        *quickstart_table(quickstart),
        "",
        "## Run-to-run stability",
        "",
        "How much one AlignDistil run moves under float noise of the size that differs between machines, and why, "
        "is measured in [AlignDistil: stability on the synthetic task](methods/aligndistil.md). The tables above "
        "report every method as a distribution over seeds for that reason.",
        "",
    ]
    return "\n".join(lines)


def speculative_section(record: dict) -> list[str]:
    """Draft models for speculative decoding (bench/speculative.py): α and block efficiency per draft, and the paired
    comparisons of α on target text."""
    summary = record["summary"]
    lines = [
        "## Speculative decoding: draft distillation (DistillSpec, Goel et al.)",
        "",
        f"File: [bench/reproductions/speculative.json](../bench/reproductions/speculative.json) (command: "
        f"`{record['command']}`, {len(record['seeds'])} seeds). Target: each seed's aligned "
        "tiny teacher; drafts: the smaller tiny student after SFT, then each distillation recipe for the same "
        "optimizer steps. α = Σ min(p, q) averaged over the tokens of the target's samples for the seed's test "
        "prompts (target text) and of the draft's own samples (draft text); block efficiency (1 − α^(γ+1)) / (1 − α) "
        "at γ = 4 from α on target text; the reference sampler's measured acceptance and tokens per target call at "
        "γ = 4 (no KV cache, tiny models: its wall-clock speed-up says little about serving). "
        "Method and formulas: [docs/methods/speculative.md](methods/speculative.md).",
        "",
        "| draft | α target text | α draft text | block efficiency γ=4 | sampler α | sampler tokens/call | "
        "sampler speed-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, row in summary.items():
        lines.append(
            f"| {label(method)} | {row['alpha_target_text']:.3f} ± {row['alpha_target_text_sd']:.3f} | "
            f"{row['alpha_draft_text']:.3f} ± {row['alpha_draft_text_sd']:.3f} | "
            f"{row['block_efficiency_gamma4']:.2f} | {row['sampler_acceptance']:.3f} | "
            f"{row['sampler_block_efficiency']:.2f} | {row['sampler_speedup']:.2f}× |"
        )
    lines += [
        "",
        "| draft − baseline | α target text Δ [95 % CI] | seeds +/− | α draft text Δ [95 % CI] | what the target-text "
        "interval supports |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    by_pair = {(c["method"], c["baseline"], c["metric"]): c for c in record["comparisons"]}
    for method, baseline in dict.fromkeys((c["method"], c["baseline"]) for c in record["comparisons"]):
        row, own = by_pair[method, baseline, "alpha_target_text"], by_pair[method, baseline, "alpha_draft_text"]
        verdict = (
            f"no difference ({label(method)} ≈ {label(baseline)})"
            if row["verdict"] == "no difference"
            else f"{label(method)} {row['verdict']}"
        )
        lines.append(
            f"| {label(method)} − {label(baseline)} | {_interval(row)} | {row['positive']}/{row['negative']} of "
            f"{row['seeds']} | {_interval(own)} | {verdict} |"
        )
    if record.get("smollm2"):
        lines += smollm2_table(record["smollm2"])
    return [*lines, ""]


def smollm2_table(record: dict) -> list[str]:
    """One seed on a real target: α per draft and the block efficiency at γ = 4 (no interval: one seed)."""
    lines = [
        "",
        f"SmolLM2 as the target (one seed): {record['target']}; draft: {record['draft']}; each method "
        f"{record['steps']['method']} optimizer steps from it; α on the target's samples for "
        f"{record['eval']['prompts']} held-out prompts of examples/smollm2.",
        "",
        "| draft | α target text | α draft text | block efficiency γ=4 | sampler α | sampler tokens/call |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in record["runs"]:
        lines.append(
            f"| {label(row['method'])} | {row['alpha_target_text']:.3f} | {row['alpha_draft_text']:.3f} | "
            f"{row['block_efficiency']['4']:.2f} | {row['sampler']['acceptance']:.3f} | "
            f"{row['sampler']['block_efficiency']:.2f} |"
        )
    return lines


def replace_block(text: str, name: str, body: list[str], where: str) -> str:
    begin, end = f"<!-- BEGIN {name}: rendered by python -m bench.render_results -->", f"<!-- END {name} -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{where}: missing the `{begin}` … `{end}` markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + "\n" + "\n".join(body) + "\n" + end + tail


def render_all() -> dict[Path, str]:
    """{path: the text it should have}."""
    records = {family: load(family) for family in FAMILIES}
    quickstart = load("quickstart")
    readme = README.read_text()
    readme = replace_block(readme, "quickstart-table", quickstart_block(quickstart), "README.md")
    readme = replace_block(readme, "headline", headline_block(records), "README.md")
    speculative = load("speculative") if (DATA / "speculative.json").exists() else None
    return {RESULTS_MD: render_results_page(records, quickstart, speculative), README: readme}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing; exit 1 on a difference")
    options = parser.parse_args(argv)
    stale = []
    for path, text in render_all().items():
        if options.check:
            if path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    for path in stale:
        print(f"{path.relative_to(ROOT)} differs from the JSON: run `python -m bench.render_results`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
