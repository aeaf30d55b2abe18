"""bench/aligndistil_stability.py's pure parts (no training): the perturbations, the per-batch AlignDistil diagnostics
(checked against docs/methods/aligndistil.md §8.2's worked example), and the trajectory analysis."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import aligndistil_stability as bench


def test_parse_perturbation():
    assert bench.parse_perturbation("none") == {"kind": "none"}
    assert bench.parse_perturbation("noise:3") == {"kind": "noise", "seed": 3, "std": bench.NOISE_STD}
    assert bench.parse_perturbation("noise:3", noise_std=1e-6)["std"] == 1e-6
    assert bench.parse_perturbation("threads:2") == {"kind": "threads", "threads": 2}
    for bad in ("noise", "noise:x", "threads:0", "none:1", "shuffle:1", ""):
        with pytest.raises(ValueError, match="perturbation"):
            bench.parse_perturbation(bad)


def test_parse_variant():
    assert bench.parse_variant("default") == ("default", {})
    assert bench.parse_variant("fix:eps=0.1,tvd_scale=2,tvd_half=true,variant=contrastive") == (
        "fix",
        {"eps": 0.1, "tvd_scale": 2, "tvd_half": True, "variant": "contrastive"},
    )
    with pytest.raises(ValueError, match="key=value"):
        bench.parse_variant("fix:eps")
    with pytest.raises(ValueError, match="name"):
        bench.parse_variant(":eps=1")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    model.register_buffer("steps", torch.zeros(1, dtype=torch.long))
    return model


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_perturb_is_seeded_tiny_and_in_place():
    base = _flat(_model())
    a, b, c = _model(), _model(), _model()
    count = bench.perturb_(a, 1e-3, seed=1)
    bench.perturb_(b, 1e-3, seed=1)
    bench.perturb_(c, 1e-3, seed=2)
    assert count == base.numel()
    assert torch.equal(_flat(a), _flat(b))  # same seed, same noise
    assert not torch.equal(_flat(a), _flat(c))
    delta = _flat(a) - base
    assert 0.5e-3 < float(delta.std()) < 2e-3  # about the requested standard deviation
    zero = _model()
    bench.perturb_(zero, 0.0, seed=1)
    assert torch.equal(_flat(zero), base)


# docs/methods/aligndistil.md §8.2: B = 1, T = 3, V = 4, mask [1, 1, 0], β0 = 0.1, r = 10, ε = 1e-3.
STUDENT = [[0.5, -0.2, 1.0, 0.0], [1.2, 0.3, -0.5, 0.1], [0.0, 0.0, 0.0, 0.0]]
DPO = [[1.0, -0.5, 0.8, 0.2], [0.9, 0.6, -0.4, 0.0], [0.3, 0.1, 0.2, 0.0]]
REV = [[0.4, 0.1, 1.1, -0.1], [1.0, 0.2, -0.3, 0.3], [0.0, 0.5, 0.1, 0.2]]


def _diagnostics(marker=(True, False, False), **kw):
    t = [torch.tensor([x], dtype=torch.float64) for x in (STUDENT, DPO, REV)]
    mask = torch.tensor([[True, True, False]])
    settings = {"beta0": 0.1, "tvd_scale": 10.0, "eps": 1e-3, **kw}
    return bench.batch_diagnostics(*t, mask, torch.tensor([list(marker)]), **settings)


def test_batch_diagnostics_matches_the_worked_example():
    d = _diagnostics()
    alphas, betas, kls = (4.269091, 2.072824), (0.023424, 0.048243), (1.847569, 0.288684)
    assert d["alpha_mean"] == pytest.approx(sum(alphas) / 2, abs=1e-5)
    assert d["alpha_max"] == pytest.approx(max(alphas), abs=1e-5)
    assert d["beta_mean"] == pytest.approx(sum(betas) / 2, abs=1e-5)
    assert d["beta_max"] == pytest.approx(max(betas), abs=1e-5)
    assert d["kl_mean"] == pytest.approx(sum(kls) / 2, abs=1e-5)
    assert d["kl_max"] == pytest.approx(max(kls), abs=1e-5)
    weighted = [a * b for a, b in zip(betas, kls)]
    assert d["weighted_kl_mean"] == pytest.approx(0.028602, abs=1e-5)  # = the loss of the example
    assert d["marker_loss_share"] == pytest.approx(weighted[0] / sum(weighted), abs=1e-4)
    assert d["marker_alpha"] == pytest.approx(alphas[0], abs=1e-5)
    assert d["beta_ge_10_share"] == 0.0
    # the raw extrapolated teacher of the scored rows: z* = D + α(D − R)
    z = [[d_ + a * (d_ - r_) for d_, r_ in zip(DPO[t], REV[t])] for t, a in enumerate(alphas)]
    assert d["teacher_max_logit"] == pytest.approx(max(max(row) for row in z), abs=1e-4)
    assert d["teacher_logit_range_max"] == pytest.approx(max(max(r) - min(r) for r in z), abs=1e-4)
    assert 0 < d["teacher_entropy_mean"] < math.log(4)
    assert 0 < d["student_entropy"] < math.log(4)


def test_batch_diagnostics_ignore_masked_rows_and_report_saturation():
    d = _diagnostics()
    # changing the masked row changes nothing
    t = [torch.tensor([x], dtype=torch.float64) for x in (STUDENT, DPO, REV)]
    t[1][0, 2] = torch.tensor([50.0, -50.0, 0.0, 0.0])
    other = bench.batch_diagnostics(
        *t, torch.tensor([[True, True, False]]), torch.tensor([[True, False, False]]), 0.1, 10.0, 1e-3
    )
    assert other == pytest.approx(d)
    # where the two DPO models agree, α = ε and β = β0/ε = 100: the saturated share counts it
    same = [torch.tensor([x], dtype=torch.float64) for x in (STUDENT, DPO, DPO)]
    s = bench.batch_diagnostics(
        *same, torch.tensor([[True, True, False]]), torch.tensor([[False, False, False]]), 0.1, 10.0, 1e-3
    )
    assert s["beta_ge_10_share"] == 1.0 and s["beta_max"] == pytest.approx(100.0)
    assert math.isnan(s["marker_alpha"]) and s["marker_loss_share"] == 0.0


def _trajectory(values: dict[str, list[float]]) -> list[dict]:
    steps = len(next(iter(values.values())))
    return [{"step": i, **{k: v[i] for k, v in values.items()}} for i in range(steps)]


def test_first_divergence():
    a = _trajectory({"loss": [1.0, 1.0, 1.0, 2.0], "grad_norm": [5.0, 5.0, 5.0, 5.0]})
    b = _trajectory({"loss": [1.0, 1.001, 1.5, 0.5], "grad_norm": [5.0, 5.0, 5.0, 5.0]})
    assert bench.first_divergence([a, b], "loss") == 2  # 0.1 % at step 1 is under the 1 % tolerance
    assert bench.first_divergence([a, b], "loss", rel_tol=1e-4) == 1
    assert bench.first_divergence([a, b], "grad_norm") is None
    assert bench.first_divergence([a, b], "missing") is None
    assert bench.first_divergence([a], "loss") is None  # one run cannot diverge
    # steps some run lacks are skipped (e.g. step 0 has no loss)
    c = [{"step": 0}, *b[1:]]
    assert bench.first_divergence([a, c], "loss") == 2


def test_summarize_trajectory():
    t = [
        {"step": 0, "probe_p_polite": 0.5},
        {"step": 1, "loss": 3.0, "grad_norm": 10.0, "alpha_max": 19.9, "teacher_max_logit": 200.0},
        {"step": 2, "loss": 2.0, "grad_norm": 30.0, "alpha_max": 18.0, "teacher_max_logit": 250.0,
         "probe_p_polite": 0.9, "param_dist": 0.1},
    ]  # fmt: skip
    s = bench.summarize_trajectory(t)
    assert s["steps"] == 3 and s["final_loss"] == 2.0
    assert (s["grad_norm_max"], s["grad_norm_max_step"], s["grad_norm_mean"]) == (30.0, 2, 20.0)
    assert s["alpha_max_peak"] == 19.9 and s["teacher_max_logit_peak"] == 250.0
    assert s["final_probe_p_polite"] == 0.9 and s["final_param_dist"] == 0.1
    assert bench.summarize_trajectory([]) == {"steps": 0}


def test_rounded_and_outcome_stats():
    assert bench.rounded({"step": 3, "x": 1.23456789, "y": None}) == {"step": 3, "x": 1.23457, "y": None}
    s = bench.outcome_stats([0.5, 0.9, 1.0])
    assert s["n"] == 3 and s["min"] == 0.5 and s["max"] == 1.0
    assert s["mean"] == pytest.approx(0.8) and s["sd"] == pytest.approx(0.26458, abs=1e-4)
    assert bench.outcome_stats([0.4])["sd"] == 0.0


def test_analyse_groups_by_variant_seed_and_scope():
    def run(variant, preference, losses, perturbation="none", base="reference"):
        final = {"reward": preference / 2, "capability": 0.2, "preference": preference}
        trajectory = _trajectory({"loss": losses})
        return {"variant": variant, "seed": 0, "base": base, "perturbation": {"name": perturbation}, "final": final,
                "trajectory": trajectory}  # fmt: skip

    runs = [
        run("default", 0.95, [1.0, 1.0, 2.0]),
        run("default", 0.55, [1.0, 1.0, 1.0], "noise:1"),
        run("fix", 0.99, [1.0, 1.0, 1.0]),
        run("fix", 0.98, [1.0, 1.0, 1.0], "noise:1"),
    ]
    result = bench.analyse(runs)
    assert set(result) == {"default/seed0/stage", "fix/seed0/stage"}  # no perturbed base: no pipeline scope
    default = result["default/seed0/stage"]
    assert default["runs"] == 2 and default["ends_well"] == 1
    assert default["preference"]["min"] == 0.55 and default["preference"]["max"] == 0.95
    assert default["first_divergence_step"]["loss"] == 2
    assert result["fix/seed0/stage"]["ends_well"] == 2
    assert result["fix/seed0/stage"]["first_divergence_step"]["loss"] is None
    # a perturbed base adds the pipeline scope: the unperturbed stage on every base
    result = bench.analyse([*runs, run("default", 0.3, [1.0, 3.0, 3.0], base="noise:1")])
    pipeline = result["default/seed0/pipeline"]
    assert pipeline["runs"] == 2 and pipeline["preference"]["min"] == 0.3
    assert pipeline["first_divergence_step"]["loss"] == 1
    assert result["default/seed0/stage"]["runs"] == 2


def test_public_config_hides_run_paths():
    config = {
        "model_name_or_path": "/tmp/x/student_sft",
        "teacher_model_name_or_path": "/tmp/x/teacher_dpo",
        "reference_model_name_or_path": "/tmp/x/teacher_rev_dpo",
        "dataset_name": "/tmp/x/data/pairs.jsonl",
        "tvd_scale": 10.0,
    }
    assert bench.public_config(config) == {
        "model_name_or_path": "${student_sft}",
        "teacher_model_name_or_path": "${teacher_dpo}",
        "reference_model_name_or_path": "${teacher_rev_dpo}",
        "dataset_name": "${data}/pairs.jsonl",
        "tvd_scale": 10.0,
    }


def test_run_cache_is_reused_only_for_the_same_key(tmp_path):
    key = {"config": {"eps": 0.001}, "perturbation": {"kind": "none"}, "version": 1}
    record = {"key": key, "final": {"preference": 0.5}, "trajectory": [{"step": 0}]}
    (tmp_path / "stability_run.json").write_text(json.dumps(record))
    torch.save(torch.zeros(2, 3), tmp_path / "snapshots.pt")

    def never():
        raise AssertionError("a cached run must not train again")

    final, trajectory, snapshots = bench._run_cached(tmp_path, key, 0, never)
    assert final == {"preference": 0.5} and trajectory == [{"step": 0}]
    assert len(snapshots) == 2 and torch.equal(snapshots[0], torch.zeros(3))

    class Trained(Exception):
        pass

    def train():
        raise Trained

    with pytest.raises(Trained):  # another key trains again
        bench._run_cached(tmp_path, {**key, "config": {"eps": 0.1}}, 0, train)


def test_trajectory_stats():
    a = [
        {"step": 0, "probe_p_polite": 0.4, "probe_polite_rate": 0.5, "param_dist": 1e-5},
        {"step": 1, "loss": 2.0, "grad_norm": 0.5, "marker_loss_share": 0.01, "teacher_max_logit": 100.0},
        {"step": 2, "loss": 4.0, "grad_norm": 3.0, "marker_loss_share": 0.03, "teacher_max_logit": 300.0,
         "probe_p_polite": 0.6, "probe_polite_rate": 0.7, "param_dist": 3e-5},
    ]  # fmt: skip
    b = [{"step": 0, "probe_p_polite": 0.2}, {"step": 1, "loss": 6.0, "grad_norm": 1.5, "probe_p_polite": 0.4}]
    s = bench.trajectory_stats([a, b])
    assert s["loss_mean"] == 4.0 and s["marker_loss_share_mean"] == pytest.approx(0.02)
    assert s["teacher_max_logit_peak"] == 300.0 and s["grad_norm_peak"] == 3.0 and s["grad_norm_min"] == 0.5
    assert s["clipped_step_share"] == pytest.approx(2 / 3)  # 3.0 and 1.5 exceed the default max_grad_norm 1.0
    assert s["probe_p_polite_start"] == pytest.approx(0.3) and s["probe_p_polite_end"] == pytest.approx(0.5)
    assert s["probe_polite_rate_end"] == 0.7  # only the run that has it
    assert (s["param_dist_min"], s["param_dist_max"]) == (1e-5, 3e-5)
    assert "alpha_max_peak" not in s
    assert bench.trajectory_stats([]) == {}


def test_to_json_keeps_the_record_and_puts_each_point_on_one_line():
    record = {
        "command": "x",
        "runs": [{"seed": 0, "final": {"preference": 0.5}, "trajectory": [{"step": 0, "loss": 1.5}, {"step": 1}]}],
    }
    text = bench.to_json(record)
    assert json.loads(text) == record
    assert '    {"step": 0, "loss": 1.5},' in text.splitlines()
    assert bench.to_json({"runs": []}).endswith("\n")
    rounded = json.loads(bench.to_json({"runs": [{"trajectory": [{"step": 1, "x": 1.23456789}]}]}, digits=3))
    assert rounded["runs"][0]["trajectory"] == [{"step": 1, "x": 1.23}]


def test_max_abs_diff(tmp_path):
    from safetensors.torch import save_file

    for name, shift in (("a", 0.0), ("b", 0.25)):
        (tmp_path / name).mkdir()
        weights = {"w": torch.zeros(2, 2), "v": torch.ones(3)}
        weights["v"][1] += shift
        save_file(weights, str(tmp_path / name / "model.safetensors"))
    assert bench.max_abs_diff(tmp_path / "a", tmp_path / "b") == 0.25
    assert bench.max_abs_diff(tmp_path / "a", tmp_path / "a") == 0.0


def test_weights_digest(tmp_path):
    for name, data in (("a", b"one"), ("b", b"one"), ("c", b"two")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(data)
    digest = bench.weights_digest
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
