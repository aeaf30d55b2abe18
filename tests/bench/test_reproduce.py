"""The reproduction's protocol pieces: variant stages, learning-rate selection, paired comparisons."""

import pytest

from align_distill.pipeline import Pipeline, references
from align_distill.quickstart.stages import STUDENT_STEPS
from bench import reproduce


def _train_steps(stages):
    return sum(s.config["max_steps"] for s in stages if "max_steps" in s.config and s.target != "cyclealign")


@pytest.mark.parametrize("method", [m for m in reproduce.method_builders() if m != "cyclealign"])
def test_every_method_trains_the_same_step_budget(method):
    assert _train_steps(reproduce.variant_stages(method, 0, 200, 1.0)) == STUDENT_STEPS


def test_variants_live_side_by_side_and_share_what_does_not_depend_on_them():
    every = []
    for method in ("dckd", "sft_chosen", "adpa_plus"):
        for steps in reproduce.SFT_BUDGETS:
            for factor in reproduce.LR_FACTORS:
                every.append(reproduce.variant_stages(method, 0, steps, factor))
    base = reproduce.base_stages(0)
    stages, names = list(base), {s.name for s in base}
    for variant in every:
        for stage in variant:
            if stage.name in names:  # a shared stage must be the very same stage
                assert next(s for s in stages if s.name == stage.name).config == stage.config
            else:
                stages.append(stage)
                names.add(stage.name)
    Pipeline("unused", stages)  # unique names, every reference to an earlier stage
    # the teacher's signals on the data do not depend on the learning rate: one per SFT budget, not one per factor
    assert sorted(n for n in names if n.startswith("dckd_signals")) == ["dckd_signals_sft200", "dckd_signals_sft400"]


def test_variant_scales_every_learning_rate_and_starts_from_its_budget():
    centre = reproduce.variant_stages("adpa_plus", 1, 400, 1.0)
    scaled = reproduce.variant_stages("adpa_plus", 1, 400, 4.0)
    trained = [(a, b) for a, b in zip(centre, scaled) if a.kind == "train"]
    assert len(trained) == 2 and all(b.config["learning_rate"] == 4 * a.config["learning_rate"] for a, b in trained)
    first = scaled[0]
    assert "student_sft_400" in references(first) and "student_sft" not in references(first)
    assert scaled[-1].name == "adpa_plus_student_sft400_lrx4"
    assert "adpa_plus_dckd_student_sft400_lrx4" in references(scaled[2])  # the rollout of the scaled DCKD half


def test_sft_chosen_is_dckd_without_the_teacher_terms():
    dckd = reproduce.variant_stages("dckd", 0, 200, 1.0)[-1].config
    control = reproduce.variant_stages("sft_chosen", 0, 200, 1.0)[-1].config
    assert control["chosen_kl_weight"] == control["rejected_kl_weight"] == 0.0
    differing = {k for k in dckd if dckd[k] != control.get(k)}
    assert differing == {"chosen_kl_weight", "rejected_kl_weight"}


def _row(method, seed, factor, validation, test=0.5, steps=200, selected=None):
    row = {"method": method, "seed": seed, "sft_steps": steps, "lr_factor": factor, "validation_reward": validation}
    row.update({f"test_{m}": test for m in reproduce.METRICS})
    if selected is not None:
        row["selected"] = selected
    return row


def test_selection_uses_validation_only_and_prefers_the_centre_on_ties():
    rows = [
        _row("dpo", 0, 0.25, 0.4, test=0.9),
        _row("dpo", 1, 0.25, 0.4, test=0.9),
        _row("dpo", 0, 1.0, 0.5, test=0.1),
        _row("dpo", 1, 1.0, 0.5, test=0.1),
        _row("dpo", 0, 4.0, 0.6, test=0.1),
        _row("dpo", 1, 4.0, 0.45, test=0.1),
        _row("dckd", 0, 0.25, 0.5),  # a tie: the centre wins
        _row("dckd", 0, 1.0, 0.5),
    ]
    assert reproduce.select_factors(rows) == {"dckd": {200: 1.0}, "dpo": {200: 4.0}}


def test_comparisons_pair_selected_runs_by_seed():
    rows = [_row("a", s, 1.0, 0.0, test=0.6 + 0.01 * s, selected=True) for s in range(10)]
    rows += [_row("b", s, 1.0, 0.0, test=0.5, selected=True) for s in range(10)]
    rows += [_row("a", 0, 4.0, 0.0, test=0.0, selected=False)]  # an unselected grid point never counts
    found = reproduce.comparisons(rows, (("a", "b"),))
    reward = next(c for c in found if c["metric"] == "reward")
    assert reward["seeds"] == 10 and reward["positive"] == 10 and reward["verdict"] == "higher"
    assert reward["mean"] == pytest.approx(0.145)


def test_trl_baseline_matches_the_kd_stage_it_is_compared_with():
    ours = reproduce.variant_stages("kd_forward_kl", 2, 200, 4.0)[-1]
    trl = reproduce.variant_stages("trl_forward_kl", 2, 200, 4.0)[-1]
    assert trl.kind == "call" and trl.target == "bench.trl_distillation:train" and trl.config["beta"] == 0.0
    for key in (
        "model_name_or_path",
        "teacher_model_name_or_path",
        "dataset_name",
        "max_steps",
        "learning_rate",
        "seed",
        "per_device_train_batch_size",
        "max_completion_length",
        "temperature",
    ):
        assert trl.config[key] == ours.config[key], key
    assert ours.config["lmbda"] == 1.0  # TRL's trainer is on-policy only: so is the kd stage it is compared with


def test_kd_family_runs_at_one_sft_budget_and_selects_a_divergence():
    assert reproduce.family_budgets("kd") == (200,) and reproduce.family_budgets("adpa") == reproduce.SFT_BUDGETS
    rows = [
        {"method": "kd_forward_kl", "tuning": True, "selected": True, "validation_reward": 0.5},
        {"method": "kd_forward_kl", "tuning": True, "selected": False, "validation_reward": 0.9},
        {"method": "kd_akl", "tuning": True, "selected": True, "validation_reward": 0.6},
        {"method": "trl_forward_kl", "tuning": True, "selected": True, "validation_reward": 0.95},
        {"method": "kd_jsd", "tuning": False, "selected": True, "validation_reward": 0.99},
    ]
    chosen = reproduce.select_divergence(rows)
    assert chosen["method"] == "kd_akl" and chosen["loss"] == {"divergence": "akl", "mu": 0.5}


def test_the_quickstart_kd_student_uses_the_divergence_chosen_on_validation():
    import json

    from align_distill.quickstart.stages import KD_DIVERGENCE

    record = json.loads((reproduce.OUT / "kd.json").read_text())
    assert KD_DIVERGENCE == record["selected_divergence"]["loss"]
