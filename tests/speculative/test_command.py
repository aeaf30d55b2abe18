"""`align-distill evaluate speculative` (speculative.command.main) on the tiny models, its user errors, and the two
draft recipes of the kd method."""

import json

import pytest

from align_distill.commands import train_arguments
from align_distill.speculative.command import main
from align_distill.trainers import kd


def _prompts(tmp_path, rows):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reports_every_draft_in_json_and_markdown(tiny_models, tmp_path, capsys):
    prompts = _prompts(tmp_path, [{"prompt": "what is 2 + 3"}, {"prompt": [{"role": "user", "content": "hi"}]}])
    out = tmp_path / "out"
    argv = ["--target", str(tiny_models["teacher"]), "--drafts", f"{tiny_models['student']},{tiny_models['teacher']}"]
    argv += ["--prompts", str(prompts), "--max_new_tokens", "6", "--timing_prompts", "1", "--output_dir", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "speculative.json").read_text())
    student, same = record["drafts"][str(tiny_models["student"])], record["drafts"][str(tiny_models["teacher"])]
    assert list(student["block_efficiency"]) == [str(g) for g in range(1, 9)]
    assert 0 < student["alpha_target_text"] < 1 and 0 < student["alpha_draft_text"] < 1
    # the target as its own draft: α = 1 on any text, every drafted token accepted, γ + 1 tokens per call
    assert same["alpha_target_text"] == pytest.approx(1.0, abs=1e-5)
    assert same["sampler"]["acceptance"] == 1.0 and same["block_efficiency"]["8"] == pytest.approx(9.0, abs=1e-3)
    assert "| draft | α target text |" in (out / "speculative.md").read_text()
    assert "2 drafts" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([{"prompt": "x"}], ["--temperature", "0"], "`temperature`: must be > 0"),
        ([{"text": "x"}], [], "row 1: expected `prompt`"),
        (None, [], "`prompts`: no such file"),
        ([{"prompt": "x"}, "not json"], [], "row 2"),
    ],
)
def test_user_mistakes_are_one_line(tiny_models, tmp_path, capsys, rows, extra, message):
    prompts = _prompts(tmp_path, rows) if rows is not None else tmp_path / "missing.jsonl"
    models = ["--target", str(tiny_models["teacher"]), "--drafts", str(tiny_models["student"])]
    argv = [*models, "--prompts", str(prompts)]
    assert main(argv + extra + ["--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and err.startswith("error: ")


def test_help_lists_the_keys(capsys):
    assert main(["--help"]) == 0
    assert "timing_prompts" in capsys.readouterr().out


def test_the_draft_recipes_parse(tmp_path, monkeypatch):
    # trainers/kd.py lists each divergence with its config fields; until it lists tvdpp, register it here
    monkeypatch.setitem(kd.DIVERGENCE_FIELDS, "tvdpp", ())
    parsed = {}
    for name in ("kd/draft_on_policy", "kd/draft_target_samples"):
        _, (_, training, _) = train_arguments("kd", ["--config", name, "--output_dir", str(tmp_path / name)])
        parsed[name] = training
    assert parsed["kd/draft_on_policy"].lmbda == 1.0 and parsed["kd/draft_on_policy"].divergence == "tvd"
    assert parsed["kd/draft_target_samples"].lmbda == 0.0 and parsed["kd/draft_target_samples"].divergence == "tvdpp"
