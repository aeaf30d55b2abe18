import json
import subprocess
import sys

import pytest

from align_distill.cli import main


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "generate", "pipeline", "quickstart", "data", "models"):
        assert command in out


def test_train_help_lists_methods(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "dpo" in out


def test_unknown_method_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown method 'dpp'; choose one of"):
        main(["train", "dpp"])


def test_data_validate_exit_codes(tmp_path, capsys):
    good = tmp_path / "sft.jsonl"
    good.write_text(json.dumps({"prompt": "sort: b a", "completion": "sure, a b"}) + "\n")
    assert main(["data", "validate", str(good), "--format", "completion"]) == 0
    assert "OK: 1 rows" in capsys.readouterr().out
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "x"}) + "\n" + "{not json\n")
    assert main(["data", "validate", str(bad), "--format", "preference"]) == 1
    out = capsys.readouterr().out
    assert "pairs.jsonl:row 2" in out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "align_distill.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "quickstart" in result.stdout
