import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import align_distill
from align_distill.cli import main
from align_distill.commands import train_arguments
from align_distill.data_gen.config import load_config
from align_distill.quickstart import run as quickstart_run


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "generate", "evaluate", "pipeline", "quickstart", "data", "models"):
        assert command in out


def test_train_help_lists_methods(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "dpo" in out


def test_unknown_method_is_a_clear_error(capsys):
    assert main(["train", "dpp"]) == 2
    assert "error: unknown method `dpp` (did you mean `dpo`?)" in capsys.readouterr().err


def test_data_validate_exit_codes(tmp_path, capsys):
    good = tmp_path / "sft.jsonl"
    good.write_text(json.dumps({"prompt": "sort: b a", "completion": "sure, a b"}) + "\n")
    assert main(["data", "validate", str(good), "--format", "completion"]) == 0
    assert "OK: 1 rows" in capsys.readouterr().out
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "x"}) + "\n" + "{not json\n")
    assert main(["data", "validate", str(bad), "--format", "preference"]) == 1
    assert "pairs.jsonl:row 2" in capsys.readouterr().err  # problems go to stderr


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "align_distill.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "quickstart" in result.stdout


# -- one config machinery: errors are one line, exit code 2, no traceback ------------------------------------------
BAD_YAML = "model_name_or_path: m\nlearning_rate: 1e-3\nmax_steps: [1, 2\n"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "align_distill.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "ALIGN_DISTILL_DEBUG": "", **(env or {})},
        timeout=300,
    )


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def bad_yaml(tmp_path) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_YAML)
    return str(path)


def test_version_is_fast_and_loads_no_framework():
    assert cli("--version").stdout.strip() == f"align-distill {align_distill.__version__}"
    code = (
        "import sys; from align_distill.cli import main; main(['--version']); main([]); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("False")


def test_bad_yaml_is_one_line_for_every_command(bad_yaml):
    for command in (["train", "dckd"], ["generate", "sample"], ["quickstart"]):
        result = cli(*command, "--config", bad_yaml)
        assert result.returncode == 2, (command, result.stderr)
        assert "Traceback" not in result.stderr
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert line.startswith(f"error: {bad_yaml}: not valid YAML: ") and "line 4, column 1" in line, line
    result = cli("pipeline", bad_yaml)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {bad_yaml}: not valid YAML: " in result.stderr and "line 4, column 1" in result.stderr


def test_debug_shows_the_traceback(bad_yaml):
    result = cli("--debug", "generate", "sample", "--config", bad_yaml)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ConfigError" in result.stderr
    result = cli("quickstart", "--config", bad_yaml, env={"ALIGN_DISTILL_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_unknown_train_key_and_post_init_error_are_one_line(tmp_path, capsys):
    config = tmp_path / "dckd.yaml"
    config.write_text("model_name_or_path: m\nsignals_path: s\n\nlerning_rate: 1e-3\n")
    assert main(["train", "dckd", "--config", str(config)]) == 2
    assert one_error_line(capsys) == (
        f"error: {config}: line 4: unknown key `lerning_rate` for dckd (did you mean `learning_rate`?)"
    )
    assert main(["train", "dckd", "--signals_path", "s", "--max_stepz", "3"]) == 2
    assert one_error_line(capsys).startswith("error: command line: unknown key `max_stepz` for dckd (did you mean")
    config.write_text("model_name_or_path: m\nteacher_mode: cache\n")  # cache mode needs signals_path
    assert main(["train", "adpa", "--config", str(config)]) == 2
    assert one_error_line(capsys) == (
        f"error: {config}: ADPAConfig: teacher_mode=cache needs signals_path (the output of `generate signals`)"
    )


def test_train_overrides_are_typed(tmp_path):
    module, (data, training, model) = train_arguments(
        "dckd",
        [
            "--signals_path=s",
            "--output_dir",
            str(tmp_path / "out"),
            "--learning_rate",
            "1e-3",
            "--max_steps",
            "7",
            "--use_peft",
            "--lora_target_modules",
            "q_proj,v_proj",
            "--no_gradient_checkpointing",
            "--report_to",
            "none",
        ],
    )
    assert training.learning_rate == 1e-3 and training.max_steps == 7 and training.gradient_checkpointing is False
    assert model.use_peft is True and model.lora_target_modules == ["q_proj", "v_proj"]
    assert module.HELP and data.dataset_name is None


def test_train_method_help_lists_keys_without_ignored_ones(capsys):
    assert main(["train", "dckd", "--help"]) == 0
    out = capsys.readouterr().out
    assert "signals_path (str | None, default None)" in out and "learning_rate" in out
    assert "  loss_type (" not in out  # a TRL field DCKD ignores
    assert main(["train", "dkcd"]) == 2
    assert "unknown method `dkcd` (did you mean `dckd`?)" in one_error_line(capsys)


def test_generate_errors_are_one_line(tmp_path, capsys):
    config = tmp_path / "rank.yaml"
    config.write_text("input: x\noutput_dir: y\njudge:\n  kind: llm\n  modle: m\n")
    assert main(["generate", "rank", "--config", str(config)]) == 2
    message = one_error_line(capsys)
    assert message == f"error: {config}: line 5: unknown key `modle` for JudgeSpec (did you mean `model`?)"
    config.write_text("input: x\noutput_dir: y\njudge:\n  kind: llm\n  model: m\n")
    assert main(["generate", "rank", "--config", str(config), "--judge.kindd", "llm"]) == 2
    assert "command line: unknown key `kindd`" in one_error_line(capsys)


def test_nested_generate_overrides_are_typed(tmp_path):
    config = load_config(
        "rank", None, ["--input", "x", "--output_dir", "y", "--judge.kind", "callable", "--judge.function", "m:f"]
    )
    assert config.judge.kind == "callable"
    config = load_config(
        "rank",
        None,
        ["--input=x", "--output_dir=y", "--judge.kind=llm", "--judge.model=m", "--judge.temperature=1e-1"],
    )
    assert config.judge.kind == "llm" and config.judge.temperature == 0.1


def pipeline_recipe(tmp_path, typo: bool) -> Path:
    training = {"model_name_or_path": "nowhere", "dataset_name": "${first}/pairs.jsonl"}
    training["lerning_rate" if typo else "learning_rate"] = 1e-3
    recipe = {
        "run_dir": str(tmp_path / "run"),
        "stages": [
            {"name": "first", "call": "tests.pipeline_stages:write_number", "config": {"value": 1}},
            {"name": "second", "call": "tests.pipeline_stages:write_number", "config": {"value": 2, "name": "b"}},
            {"name": "dpo", "train": "dpo", "config": training},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_pipeline_stage_typo_fails_before_the_first_stage_runs(tmp_path, capsys):
    recipe = pipeline_recipe(tmp_path, typo=True)
    assert main(["pipeline", str(recipe)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {recipe}: line ") and line.endswith(
        ": stage `dpo`: unknown key `lerning_rate` for dpo (did you mean `learning_rate`?)"
    )
    assert not (tmp_path / "run" / "first" / "value.txt").exists() and not (tmp_path / "calls.log").exists()

    recipe = pipeline_recipe(tmp_path, typo=False)
    assert main(["pipeline", str(recipe), "--dpo.max_stepz", "3"]) == 2
    assert one_error_line(capsys).startswith("error: command line: stage `dpo`: unknown key `max_stepz` for dpo")
    assert main(["pipeline", str(recipe), "--dop.max_steps", "3"]) == 2
    assert "has no stage `dop` (did you mean `dpo`?)" in one_error_line(capsys)
    assert main(["pipeline", str(recipe), "--second.valeu", "3"]) == 2
    assert "stage `second`: unknown key `valeu` for `tests.pipeline_stages:write_number`" in one_error_line(capsys)
    assert not (tmp_path / "calls.log").exists()


def test_pipeline_overrides_edit_the_recipe(tmp_path):
    recipe = pipeline_recipe(tmp_path, typo=False)
    spec = yaml.safe_load(recipe.read_text())
    spec["stages"] = spec["stages"][:2]
    recipe.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "elsewhere"
    assert main(["pipeline", str(recipe), "--run-dir", str(run_dir), "--second.value", "5"]) == 0
    assert (run_dir / "first" / "value.txt").read_text() == "1"
    assert (run_dir / "second" / "value.txt").read_text() == "5"
    assert main(["pipeline", str(recipe), "--run_dir", str(run_dir), "--only", "second", "--second.value=7"]) == 0
    assert (run_dir / "second" / "value.txt").read_text() == "7"
    assert (tmp_path / "calls.log").read_text().split() == ["a", "b", "b"]


def test_quickstart_settings_through_flags_overrides_and_yaml(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(quickstart_run, "run_quickstart", lambda **settings: calls.append(settings))
    assert main(["quickstart", "--seed", "3", "--methods", "dckd,adpa", "--smoke", "--from", "models"]) == 0
    assert calls[-1] == {
        "run_dir": "runs/quickstart",
        "methods": ["dckd", "adpa"],
        "seed": 3,
        "from_stage": "models",
        "smoke": True,
    }
    config = tmp_path / "quick.yaml"
    config.write_text("run_dir: r\nmethods: [dckd]\n")
    assert main(["quickstart", "--config", str(config), "--methods", "dckd", "adpa", "--run-dir", "q"]) == 0
    assert calls[-1]["methods"] == ["dckd", "adpa"] and calls[-1]["run_dir"] == "q"
    assert main(["quickstart", "--sed", "3"]) == 2
    assert "unknown key `sed` for quickstart (did you mean `seed`?)" in one_error_line(capsys)
    assert main(["quickstart", "--methods", "dckd,nope"]) == 2
    assert "unknown methods ['nope']" in one_error_line(capsys)

    def stop(**settings):
        raise SystemExit("quickstart: a message from a script")

    monkeypatch.setattr(quickstart_run, "run_quickstart", stop)
    assert main(["quickstart"]) == 2
    assert one_error_line(capsys) == "error: quickstart: a message from a script"


def test_recipe_names_are_accepted_by_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no quickstart outputs here: the recipe's needs are named
    assert main(["train", "dckd", "--config", "dckd/cache"]) == 2
    assert "`dckd/cache.yaml` needs the quickstart's outputs" in one_error_line(capsys)
    assert main(["generate", "signals", "--config", "dckd/signals"]) == 2
    assert "run `align-distill quickstart` first" in capsys.readouterr().err
    assert main(["train", "dckd", "--config", "dckd/cahce"]) == 2
    assert "`dckd/cahce`: no such file, and not a recipe name" in one_error_line(capsys)
    assert main(["recipes", "list"]) == 0
    assert "dckd/cache" in capsys.readouterr().out


def test_evaluate_errors_are_one_line_and_a_missing_model_names_itself(tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text("prompts: p.jsonl\noutput_dir: out\nmodels: {a: m}\nchekers: {c: 'x:y'}\n")
    assert main(["evaluate", "--config", str(config)]) == 2
    assert one_error_line(capsys) == (
        f"error: {config}: line 4: unknown key `chekers` for evaluate (did you mean `checkers`?)"
    )
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "sort: b a"}) + "\n")
    config.write_text(
        f"prompts: {prompts}\noutput_dir: {tmp_path / 'out'}\nmodels: {{a: {tmp_path / 'nowhere'}}}\n"
        "checkers: {task: 'align_distill.evaluation.checkers:synthetic_task'}\n"
    )
    assert main(["evaluate", "--config", str(config), "--generation.progress", "false"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: models.a (") and "nowhere" in line and "a rerun resumes" in line


def echo_arguments(argv: list[str]) -> int:
    """Stands in for `align_distill.speculative.command:main` (another helper's module)."""
    print(argv)
    return 0


def test_evaluate_speculative_is_dispatched_to_its_command(monkeypatch, capsys):
    from align_distill import commands

    assert commands.EVALUATE_SUBCOMMANDS["speculative"] == "align_distill.speculative.command:main"
    monkeypatch.setitem(commands.EVALUATE_SUBCOMMANDS, "speculative", "tests.test_cli:echo_arguments")
    assert main(["evaluate", "speculative", "--config", "x.yaml", "--k", "4"]) == 0
    assert capsys.readouterr().out.strip() == "['--config', 'x.yaml', '--k', '4']"
    assert main(["evaluate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "pairwise_judge" in out and "align-distill evaluate speculative" in out
