"""`align-distill push` and `push_to_hub: true`: the file set, repo id, privacy and revision, the model card's
provenance, and that the token never leaves huggingface_hub's client.

The hub is replaced by `FakeHfApi`, monkeypatched at `huggingface_hub.HfApi` (where align_distill.hub looks it up):
it records every call and keeps a copy of every uploaded file.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import string
import traceback
from pathlib import Path

import pytest
import yaml

REPO_ID = "my-org/tiny-dckd"


def fake_token() -> str:
    return "hf_" + "".join(secrets.choice(string.ascii_letters) for _ in range(34))


class FakeHfApi:
    """Records what align-distill asks of the hub; `fail_with` makes upload_folder raise."""

    calls: list[tuple[str, dict]] = []
    uploaded: dict[str, bytes] = {}
    fail_with: Exception | None = None

    def __init__(self, **kwargs):
        self.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if self.fail_with is not None:
            raise self.fail_with
        folder = Path(kwargs["folder_path"])
        type(self).uploaded = {p.name: p.read_bytes() for p in folder.iterdir()}

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/0123abc"

        return Commit()

    @classmethod
    def reset(cls):
        cls.calls, cls.uploaded, cls.fail_with = [], {}, None

    @classmethod
    def call(cls, name: str) -> dict:
        found = [kwargs for called, kwargs in cls.calls if called == name]
        assert len(found) == 1, f"{name} called {len(found)} times: {cls.calls}"
        return found[0]


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.reset()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


@pytest.fixture(scope="module")
def recipe_secret() -> str:
    return fake_token()


@pytest.fixture(scope="module")
def pipeline_run(tiny_models, tmp_path_factory, recipe_secret) -> Path:
    """A real pipeline run: synthetic data → teacher signals (data_gen) → DCKD LoRA student → evaluation.

    The training stage's config carries a hub token (a recipe's `hub_token`): it must be redacted everywhere."""
    from align_distill.pipeline import Pipeline, Stage

    run_dir = tmp_path_factory.mktemp("hub_run") / "run"
    stages = [
        Stage("data", "call", "align_distill.quickstart:write_data", {"n_sft": 8, "n_pairs": 16, "n_prompts": 4}),
        Stage(
            "signals",
            "generate",
            "signals",
            {
                "input": "${data}/pairs.jsonl",
                "teachers": [{"name": "dpo", "model": str(tiny_models["teacher"])}],
                "tokenizer": str(tiny_models["student"]),
                "top_k": 8,
                "progress": False,
            },
        ),
        Stage(
            "student",
            "train",
            "dckd",
            {
                "model_name_or_path": str(tiny_models["student"]),
                "dataset_name": "${data}/pairs.jsonl",
                "signals_path": "${signals}",
                "use_peft": True,
                "lora_r": 4,
                "lora_alpha": 8,
                "max_steps": 1,
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-3,
                "max_length": 64,
                "bf16": False,
                "save_strategy": "no",
                "disable_tqdm": True,
                "hub_token": recipe_secret,
            },
        ),
        Stage(
            "evaluate",
            "call",
            "align_distill.quickstart:evaluate_models",
            {"models": {"student_dckd": "${student}"}, "n": 4},
        ),
    ]
    Pipeline(run_dir, stages).run()
    return run_dir


def all_text(caplog, capsys) -> str:
    captured = capsys.readouterr()
    return caplog.text + captured.out + captured.err


@pytest.mark.slow
def test_push_uploads_adapter_tokenizer_card_and_record(pipeline_run, hub, tiny_models, capsys):
    from align_distill import __version__
    from align_distill.fingerprint import path_digest
    from align_distill.hub import push_command

    adapter_config = (pipeline_run / "student" / "adapter_config.json").read_bytes()
    assert push_command(str(pipeline_run), REPO_ID, private=True, revision="v1", base_model="my-org/tiny-base") == 0
    assert "pushed" in capsys.readouterr().out

    assert hub.call("create_repo") == {"repo_id": REPO_ID, "private": True, "repo_type": "model", "exist_ok": True}
    assert hub.call("create_branch")["branch"] == "v1"
    upload = hub.call("upload_folder")
    assert upload["repo_id"] == REPO_ID and upload["revision"] == "v1" and upload["repo_type"] == "model"

    files = set(hub.uploaded)
    assert {"README.md", "align_distill.json", "adapter_config.json", "adapter_model.safetensors"} <= files
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    assert not files & {"config.json", "model.safetensors", "training_args.bin", "stage.json"}
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    local = pipeline_run / "student"
    for name in files - {"README.md", "align_distill.json", "adapter_config.json"}:
        assert hub.uploaded[name] == (local / name).read_bytes(), name
    # the adapter points at the base model's hub id, in the upload only
    assert json.loads(hub.uploaded["adapter_config.json"])["base_model_name_or_path"] == "my-org/tiny-base"
    assert (local / "adapter_config.json").read_bytes() == adapter_config

    card = hub.uploaded["README.md"].decode()
    record = json.loads(hub.uploaded["align_distill.json"])
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and {"align-distill", "dckd", "lora"} <= set(front["tags"])
    assert front["base_model"] == "my-org/tiny-base"
    assert f"align-distill {__version__}" in card and record["align_distill_version"] == __version__
    assert "**dckd**" in card and record["method"] == "dckd" and record["format"] == "adapter"
    # hyperparameters of the method
    assert record["hyperparameters"]["lora_r"] == 4 and record["hyperparameters"]["max_steps"] == 1
    assert "| lora_r | 4 |" in card and "| learning_rate | 0.001 |" in card
    # student base (a local folder: identified by a content digest)
    base = record["student"]["base"]
    assert base["path"] == str(Path(tiny_models["student"]).resolve()) and len(base["sha256"]) == 64
    assert f"sha256:{base['sha256'][:16]}" in card
    # the teacher behind the signal cache
    (teacher,) = [t for t in record["teachers"] if t["role"] == "signals: signals teacher dpo"]
    assert teacher["model"]["path"] == str(Path(tiny_models["teacher"]).resolve())
    assert teacher["chain"] in card
    # datasets with fingerprints: the pairs file by content, the signal store by its job fingerprint
    datasets = {d["role"]: d for d in record["datasets"]}
    assert datasets["dataset_name"]["fingerprint"] == f"sha256:{path_digest(pipeline_run / 'data' / 'pairs.jsonl')}"
    manifest = json.loads((pipeline_run / "signals" / "manifest.json").read_text())
    assert datasets["signals_path"]["fingerprint"] == f"store:{manifest['fingerprint_sha256']}"
    # the data_gen job and its settings
    (job,) = record["data_gen"]
    assert job["job"] == "signals" and job["store_fingerprint"] == manifest["fingerprint_sha256"]
    assert "## Data generation: `signals`" in card and "signals teacher dpo" in card
    # evaluation numbers, this model marked
    evaluation = json.loads((pipeline_run / "evaluate" / "eval.json").read_text())
    assert record["evaluation"]["this_model"] == "student_dckd"
    assert f"{evaluation['student_dckd']['reward']}" in card and "**student_dckd**" in card
    # the pipeline stages behind the model
    assert list(record["stages"]) == ["data", "signals", "student"]


@pytest.mark.slow
def test_push_never_reveals_the_token(pipeline_run, hub, recipe_secret, monkeypatch, caplog, capsys):
    from align_distill.hub import PushError, push_command, push_run

    token = fake_token()
    monkeypatch.setenv("HF_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    assert push_command(str(pipeline_run), REPO_ID) == 0
    assert hub.call("init")["token"] == token  # the credential reaches the hub client, and only it

    output = all_text(caplog, capsys)
    assert "pushing" in caplog.text  # the logs were captured
    for secret in (token, recipe_secret):
        assert secret not in output
        for name, content in hub.uploaded.items():
            assert secret.encode() not in content, f"{name} contains a secret"
    assert "<redacted>" in hub.uploaded["README.md"].decode()  # the recipe's hub_token, as the card shows it

    # a hub error that quotes the token: the command's message and the exception are scrubbed
    hub.reset()
    hub.fail_with = RuntimeError(f"401 Client Error: invalid credentials {token} for url https://huggingface.co")
    assert push_command(str(pipeline_run), REPO_ID) == 1
    output = all_text(caplog, capsys)
    assert "401 Client Error" in output and token not in output
    with pytest.raises(PushError) as raised:
        push_run(pipeline_run, REPO_ID)
    text = "".join(traceback.format_exception(raised.value)) + repr(raised.value)
    assert "401 Client Error" in text and token not in text
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_push_refuses_a_folder_without_a_model(tmp_path, hub, capsys):
    from align_distill.hub import push_command

    assert push_command(str(tmp_path), REPO_ID) == 2
    assert "no model or adapter" in capsys.readouterr().err
    assert hub.calls == []


def test_push_refuses_pickle_weights(tmp_path, hub, capsys):
    from align_distill.hub import push_command

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    assert push_command(str(tmp_path), REPO_ID) == 1
    assert "safetensors only" in capsys.readouterr().err
    assert [name for name, _ in hub.calls if name == "upload_folder"] == []


@pytest.mark.slow
def test_recipe_push_to_hub_publishes_after_training(tiny_models, tmp_path, hub, monkeypatch, caplog):
    """`push_to_hub: true` in a recipe: the Trainer's own push is off, align-distill records the run and pushes the
    model + tokenizer + card once, privately, to hub_model_id."""
    from trl import TrlParser

    from align_distill.hub import push_run
    from align_distill.methods import method_module
    from align_distill.methods.run import run_method
    from align_distill.quickstart import write_data

    token = fake_token()
    monkeypatch.setenv("HF_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    write_data(tmp_path, n_sft=8, n_pairs=4, n_prompts=4)
    recipe = {
        "model_name_or_path": str(tiny_models["student"]),
        "dataset_name": str(tmp_path / "sft.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "max_length": 64,
        "bf16": False,
        "save_strategy": "no",
        "disable_tqdm": True,
        "push_to_hub": True,
        "hub_model_id": "my-org/tiny-sft",
        "hub_private_repo": True,
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    module = method_module("sft")
    parsed = TrlParser(module.DATACLASSES).parse_args_and_config(args=["--config", str(tmp_path / "sft.yaml")])
    run_method("sft", module, parsed, publish=push_run)
    assert parsed[1].push_to_hub is False  # the Trainer's own push (repo at start, training_args.bin) stayed off

    assert hub.call("create_repo") == {
        "repo_id": "my-org/tiny-sft",
        "private": True,
        "repo_type": "model",
        "exist_ok": True,
    }
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "align_distill.json"} <= set(
        hub.uploaded
    )
    record = json.loads((tmp_path / "out" / "align_distill_run.json").read_text())
    assert record["method"] == "sft" and record["result"]["train_loss"] > 0
    config = record["args"]["AlignDistillSFTConfig"]
    assert config["max_steps"] == 1 and config["hub_model_id"] == "my-org/tiny-sft" and "adam_beta1" not in config
    assert record["args"]["ModelConfig"] == {"model_name_or_path": str(tiny_models["student"])}
    card = hub.uploaded["README.md"].decode()
    assert "**sft**" in card and "library_name: transformers" in card
    assert token not in caplog.text and all(token.encode() not in c for c in hub.uploaded.values())


def test_redact_hides_credentials_and_token_shaped_strings():
    from align_distill.redaction import REDACTED, redact

    token = fake_token()
    data = {
        "hub_token": "anything",
        "backend_kwargs": {"api_key": "sk-123", "base_url": "http://x"},
        "teachers": [{"model": "a", "api_key_env": "MY_KEY"}],
        "note": f"token {token} in a message",
        "max_steps": 3,
        "push_to_hub_token": None,
    }
    assert redact(data) == {
        "hub_token": REDACTED,
        "backend_kwargs": {"api_key": REDACTED, "base_url": "http://x"},
        "teachers": [{"model": "a", "api_key_env": REDACTED}],
        "note": f"token {REDACTED} in a message",
        "max_steps": 3,
        "push_to_hub_token": None,
    }


def test_push_stage_is_a_pipeline_call(monkeypatch, tmp_path):
    """The `call: align_distill.hub:push_stage` form publishes the stage folder it is given."""
    from align_distill import hub as hub_module

    seen = {}

    def fake_push_run(path, repo_id, **kwargs):
        seen.update(path=path, repo_id=repo_id, **kwargs)
        return "https://huggingface.co/x/commit/1"

    monkeypatch.setattr(hub_module, "push_run", fake_push_run)
    result = hub_module.push_stage(tmp_path / ".publish.partial", model=str(tmp_path / "student"), repo_id="o/n")
    assert seen == {"path": str(tmp_path / "student"), "repo_id": "o/n", "private": False, "revision": None}
    assert result["url"].endswith("/commit/1")
    shutil.rmtree(tmp_path, ignore_errors=True)
