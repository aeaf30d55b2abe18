"""Every row of the user-mistakes table in docs/troubleshooting.md: the command, run in a folder holding the files it
names, exits non-zero with the documented one-line message, prints no traceback and leaves no new file behind.

The table is the source of the cases, so the docs and the behaviour cannot drift apart.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from align_distill.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"
ROW = re.compile(r"^\| `(?P<command>[^`]+)` \| (?P<ticks>``?)(?P<message>.+?)(?P=ticks) \| .+ \|$")

PAIRS = [{"prompt": "What is 2 + 3?", "chosen": "5.", "rejected": "6."}]
FILES: dict[str, str | bytes] = {
    "ok.yaml": "model_name_or_path: m\ndataset_name: pairs.jsonl\nsignals_path: sig\n",
    "typo.yaml": "model_name_or_path: m\ndataset_name: pairs.jsonl\nlerning_rate: 1e-3\n",
    "bad.yaml": "a: [1, 2\nb: 3\n",
    "job_typo.yaml": "input: pairs.jsonl\noutput_dir: out\nmodel: m\nn_samples: 2\n",
    "pipe_norun.yaml": "stages:\n  - name: a\n    call: tests.pipeline_stages:write_number\n",
    "pipe_typo.yaml": "run_dir: run\nstages:\n  - name: a\n    train: sft\n"
    "    config: {model_name_or_path: m, dataset_name: pairs.jsonl, max_step: 3}\n",
    "pipe_escape.yaml": "run_dir: run\nstages:\n  - name: a\n    call: tests.pipeline_stages:write_number\n"
    "  - name: ../victim\n    call: tests.pipeline_stages:write_number\n",
    "pairs.jsonl": "".join(json.dumps(row) + "\n" for row in PAIRS),
    "renamed.jsonl": json.dumps({"prompt": "p", "good": "a", "rejected": "b"}) + "\n",
    "mixed.jsonl": json.dumps(
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": "b"}
    )
    + "\n",
    "bad_utf8.jsonl": b'{"prompt": "p", "chosen": "a\xff", "rejected": "b"}\n',
    "surrogate.jsonl": '{"prompt": "p", "chosen": "a\\ud800", "rejected": "b"}\n',
    "trunc.gguf": b"GGUF\x03\x00\x00\x00",
    "dckd_cache.yaml": "# a recipe the user already copied\n",
}


def mistakes() -> list[tuple[str, str]]:
    text = DOC.read_text()
    table = text[text.index("<!-- mistakes:begin -->") : text.index("<!-- mistakes:end -->")]
    rows = [ROW.match(line) for line in table.splitlines()[3:]]
    assert all(rows), "every table row is `command` | message | fix"
    return [(row["command"], row["message"]) for row in rows]


def test_the_table_covers_every_command():
    commands = {shlex.split(command)[1] for command, _ in mistakes()}
    assert len(mistakes()) >= 30
    assert {"train", "generate", "pipeline", "quickstart", "data", "push", "models", "recipes"} <= commands


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_models) -> Path:
    folder = tmp_path_factory.mktemp("mistakes")
    for name, content in FILES.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    shutil.copytree(tiny_models["tokenizer"], folder / "tok")
    return folder


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(("command", "message"), mistakes(), ids=[c for c, _ in mistakes()])
def test_mistake_is_one_clear_line(command, message, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ALIGN_DISTILL_DEBUG", raising=False)
    before = listing(workdir)
    try:
        code = main(shlex.split(command)[1:])
    except SystemExit as stop:  # argparse usage errors exit by themselves
        code = stop.code
    out, err = capsys.readouterr()
    assert code not in (0, None), f"exit code {code}"
    assert message in err, err
    assert "Traceback" not in out + err
    assert listing(workdir) == before, "nothing half-written"
