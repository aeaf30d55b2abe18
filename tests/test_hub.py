"""`align-distill push` and `push_to_hub: true`: the file set, repo id, privacy and revision, the model card's
provenance, and that the token never leaves huggingface_hub's client.

The hub is replaced by `FakeHfApi`, monkeypatched at `huggingface_hub.HfApi` (where align_distill.hub looks it up):
it records every call and keeps a copy of every uploaded file.
"""

from __future__ import annotations

import inspect
import json
import logging
import secrets
import shutil
import string
import traceback
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from huggingface_hub import ModelCard

REPO_ID = "my-org/tiny-dckd"
REAL_HF_API = huggingface_hub.HfApi


def fake_token() -> str:
    return "hf_" + "".join(secrets.choice(string.ascii_letters) for _ in range(34))


class FakeHfApi:
    """Records what align-distill asks of the hub; `fail_with` makes upload_folder raise.

    Every call is bound against the signature of the real `HfApi` method it stands for, so a renamed or removed
    argument fails the test as it would fail against the hub."""

    calls: list[tuple[str, dict]] = []
    uploaded: dict[str, bytes] = {}
    fail_with: Exception | None = None

    def _record(self, name: str, *args, **kwargs) -> dict:
        bound = inspect.signature(getattr(REAL_HF_API, name)).bind(self, *args, **kwargs)
        arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
        self.calls.append(("init" if name == "__init__" else name, arguments))
        return arguments

    def __init__(self, *args, **kwargs):
        self._record("__init__", *args, **kwargs)

    def create_repo(self, *args, **kwargs):
        arguments = self._record("create_repo", *args, **kwargs)
        return f"https://huggingface.co/{arguments['repo_id']}"

    def create_branch(self, *args, **kwargs):
        self._record("create_branch", *args, **kwargs)

    def upload_folder(self, *args, **kwargs):
        arguments = self._record("upload_folder", *args, **kwargs)
        if self.fail_with is not None:
            raise self.fail_with
        folder = Path(arguments["folder_path"])
        type(self).uploaded = {p.name: p.read_bytes() for p in folder.iterdir()}

        class Commit:
            commit_url = f"https://huggingface.co/{arguments['repo_id']}/commit/0123abc"

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
        Stage("test_prompts", "call", "align_distill.quickstart:write_test_prompts", {"n": 4}),
        Stage(
            "evaluate",
            "evaluate",
            "inline",
            {
                "prompts": "${test_prompts}/prompts.jsonl",
                "models": {"student_dckd": "${student}"},  # a LoRA adapter: merged into its base to generate
                "generation": {"max_completion_length": 8, "progress": False},
                "checkers": {"task": "align_distill.evaluation.checkers:synthetic_task"},
                "bootstrap_resamples": 100,
            },
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
    front = ModelCard(card).data
    assert front.library_name == "peft" and {"align-distill", "dckd", "lora"} <= set(front.tags)
    assert front.base_model == "my-org/tiny-base" and front.base_model_relation == "adapter"
    assert front.eval_results and front.eval_results[0].metric_type == "reward"
    assert {r.metric_type for r in front.eval_results} == {"reward", "capability", "preference", "n"}
    assert front.eval_results[0].dataset_name == "test_prompts/prompts.jsonl (evaluate/eval.json)"
    assert (pipeline_run / "evaluate" / "merged" / "student_dckd" / "config.json").is_file()  # the adapter, merged
    assert str(pipeline_run) not in card and str(Path(tiny_models["student"]).parent) not in card
    assert f"align-distill {__version__}" in card and record["align_distill_version"] == __version__
    assert "**dckd**" in card and record["method"] == "dckd" and record["format"] == "adapter"
    # hyperparameters of the method
    assert record["hyperparameters"]["lora_r"] == 4 and record["hyperparameters"]["max_steps"] == 1
    assert "| lora_r | 4 |" in card and "| learning_rate | 0.001 |" in card
    # student base (a local folder: identified by a content digest)
    base = record["student"]["base"]
    assert base["path"] == "local:student" and len(base["sha256"]) == 64  # no folder of the machine
    assert f"sha256:{base['sha256'][:16]}" in card
    # the teacher behind the signal cache
    (teacher,) = [t for t in record["teachers"] if t["role"] == "signals: signals teacher dpo"]
    assert teacher["model"]["path"] == "local:teacher"
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
    assert push_command(str(pipeline_run), REPO_ID, base_model="my-org/tiny-base") == 0
    assert hub.call("init")["token"] == token  # the credential reaches the hub client, and only it

    output = all_text(caplog, capsys)
    assert "pushing" in caplog.text  # the logs were captured
    for secret in (token, recipe_secret):
        assert secret not in output
        for name, content in hub.uploaded.items():
            assert secret.encode() not in content, f"{name} contains a secret"
    assert "hub_token" not in hub.uploaded["README.md"].decode()  # the recipe's hub_token: not a setting of the card

    # a hub error that quotes the token: the command's message and the exception are scrubbed
    hub.reset()
    hub.fail_with = RuntimeError(f"401 Client Error: invalid credentials {token} for url https://huggingface.co")
    assert push_command(str(pipeline_run), REPO_ID, base_model="my-org/tiny-base") == 1
    output = all_text(caplog, capsys)
    assert "401 Client Error" in output and token not in output
    with pytest.raises(PushError) as raised:
        push_run(pipeline_run, REPO_ID, base_model="my-org/tiny-base")
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
    model + tokenizer + card once, privately, to hub_model_id. The recipe's `hub_token` reaches the hub client only:
    no file of the run (training_args.bin, checkpoints, records) holds it."""
    from trl import TrlParser

    from align_distill.hub import push_run
    from align_distill.methods import method_module
    from align_distill.methods.run import run_method
    from align_distill.quickstart import write_data

    token, env_token = fake_token(), fake_token()
    monkeypatch.setenv("HF_TOKEN", env_token)
    caplog.set_level(logging.DEBUG)
    write_data(tmp_path, n_sft=8, n_pairs=4, n_prompts=4)
    recipe = {
        "model_name_or_path": str(tiny_models["student"]),
        "dataset_name": str(tmp_path / "sft.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "max_length": 64,
        "bf16": False,
        "save_strategy": "steps",
        "save_steps": 1,
        "disable_tqdm": True,
        "push_to_hub": True,
        "hub_model_id": "my-org/tiny-sft",
        "hub_private_repo": True,
        "hub_token": token,
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    module = method_module("sft")
    parsed = TrlParser(module.DATACLASSES).parse_args_and_config(args=["--config", str(tmp_path / "sft.yaml")])
    run_method("sft", module, parsed, publish=push_run)
    assert parsed[1].push_to_hub is False  # the Trainer's own push (repo at start, training_args.bin) stayed off
    assert hub.call("init")["token"] == token  # the recipe's token, handed to the hub client

    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    names = {p.relative_to(tmp_path / "out").as_posix() for p in written}
    assert {"training_args.bin", "checkpoint-1/training_args.bin", "checkpoint-2/training_args.bin"} <= names
    assert [p for p in written if token.encode() in p.read_bytes()] == []

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
    assert config["max_steps"] == 2 and config["hub_model_id"] == "my-org/tiny-sft" and "adam_beta1" not in config
    assert record["args"]["ModelConfig"] == {"model_name_or_path": str(tiny_models["student"])}
    card = hub.uploaded["README.md"].decode()
    assert "**sft**" in card
    assert ModelCard(card).data.library_name == "transformers"
    for secret in (token, env_token):
        assert secret not in caplog.text and all(secret.encode() not in c for c in hub.uploaded.values())


def test_fake_hub_binds_calls_against_the_real_hfapi_signatures(hub):
    """A renamed or misplaced argument fails here as it would against huggingface_hub."""
    api = hub(token="x", library_name="align-distill")
    api.create_repo("o/n", private=True, repo_type="model", exist_ok=True)
    with pytest.raises(TypeError):
        api.create_repo("o/n", privat=True)
    with pytest.raises(TypeError):
        api.create_branch("o/n", "v1")  # branch is keyword-only
    with pytest.raises(TypeError):
        api.upload_folder("o/n", folder_path=".")  # every upload_folder argument is keyword-only
    with pytest.raises(TypeError):
        hub(tokn="x")
    assert [name for name, _ in hub.calls] == ["init", "create_repo"]


def test_push_dry_run_writes_the_upload_and_card_locally(tmp_path, hub, monkeypatch, capsys):
    """`align-distill push RUN --repo-id X --dry-run --out DIR`: exactly the upload, locally, with no hub client and
    no token; the run folder is left untouched."""
    from align_distill.cli import main
    from tests.test_model_card import HUB_TOKEN, make_fake_run

    def no_token():
        raise AssertionError("a dry run needs no token")

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", no_token)
    run = make_fake_run(tmp_path / "machine")
    student = run / "student"
    before = {p: p.read_bytes() for p in student.rglob("*") if p.is_file()}
    out = tmp_path / "staged"
    argv = ["push", str(run), "--repo-id", REPO_ID, "--dry-run", "--out", str(out), "--base-model", "my-org/base"]
    assert main([*argv, "--license", "mit"]) == 0
    printed = capsys.readouterr().out
    assert "dry run" in printed and str(out) in printed and str(out / "README.md") in printed
    assert hub.calls == []  # no client, no network

    files = {p.name for p in out.iterdir()}
    assert files == {
        *("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"),
        *("README.md", "align_distill.json"),
    }
    assert all(not (out / name).is_symlink() and (out / name).stat().st_nlink == 1 for name in files)  # copies
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-org/base"
    assert (out / "adapter_model.safetensors").read_bytes() == (student / "adapter_model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    assert ModelCard(card).data.license == "mit" and ModelCard(card).data.base_model == "my-org/base"
    assert str(tmp_path) not in card + (out / "align_distill.json").read_text()
    assert all(HUB_TOKEN.encode() not in (out / name).read_bytes() for name in files)
    assert {p: p.read_bytes() for p in student.rglob("*") if p.is_file()} == before

    # the same upload as a real push
    monkeypatch.setenv("HF_TOKEN", fake_token())
    assert main(["push", str(run), "--repo-id", REPO_ID, "--base-model", "my-org/base", "--license", "mit"]) == 0
    assert set(hub.uploaded) == files
    assert hub.uploaded["README.md"].decode() == card

    # --out must be new or empty; without it, a fresh temporary folder
    assert main(argv) == 1 and "new or empty" in capsys.readouterr().err
    assert main(["push", str(run), "--repo-id", REPO_ID, "--dry-run", "--base-model", "my-org/base"]) == 0
    staged = Path(capsys.readouterr().out.split(" is in ", 1)[1].splitlines()[0])
    assert (staged / "README.md").exists() and staged != out
    shutil.rmtree(staged)


def test_push_stage_is_a_pipeline_call(monkeypatch, tmp_path):
    """The `call: align_distill.hub:push_stage` form publishes the stage folder it is given."""
    from align_distill import hub as hub_module

    seen = {}

    def fake_push_run(path, repo_id, **kwargs):
        seen.update(path=path, repo_id=repo_id, **kwargs)
        return "https://huggingface.co/x/commit/1"

    monkeypatch.setattr(hub_module, "push_run", fake_push_run)
    result = hub_module.push_stage(tmp_path / ".publish.partial", model=str(tmp_path / "student"), repo_id="o/n")
    assert seen == {
        "path": str(tmp_path / "student"),
        "repo_id": "o/n",
        "private": False,
        "revision": None,
        "base_model": None,
    }
    assert result["url"].endswith("/commit/1")
    shutil.rmtree(tmp_path, ignore_errors=True)


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_push_refuses_an_adapter_whose_base_is_a_local_folder_the_run_has_no_hub_id_for(tmp_path, hub, capsys):
    """The fake run's adapter names its base by a folder of the training machine, and the run knows no hub id
    for it: push and push --dry-run refuse in one line naming adapter_config.json and --base-model, before anything
    is uploaded or staged; the run folder is untouched."""
    from align_distill.cli import main
    from tests.test_model_card import make_fake_run

    run = make_fake_run(tmp_path / "machine")
    student = run / "student"
    before = {p: p.read_bytes() for p in student.rglob("*") if p.is_file()}
    out = tmp_path / "staged"
    for extra in ([], ["--dry-run", "--out", str(out)]):
        assert main(["push", str(run), "--repo-id", REPO_ID, *extra]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert str(student / "adapter_config.json") in err and "is the local folder" in err
        assert "--base-model HUB_ID" in err
    assert hub.calls == [] and not out.exists()  # no hub client, nothing staged
    assert {p: p.read_bytes() for p in student.rglob("*") if p.is_file()} == before
    # --base-model must be a hub id, not another local folder
    assert main(["push", str(run), "--repo-id", REPO_ID, "--dry-run", "--base-model", str(tmp_path)]) == 1
    assert "--base-model" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("known_by", ["training config", "hub cache"])
def test_push_names_the_hub_id_of_a_local_base_that_the_run_records(tmp_path, hub, monkeypatch, capsys, known_by):
    """A local base the run knows a hub id for (the training config named the hub id, or the folder is a snapshot of
    the hub cache): the staged adapter_config.json names the hub id, in a push and a dry run alike, and the user's
    file is untouched."""
    from align_distill.cli import main
    from tests.test_model_card import make_fake_run

    run = make_fake_run(tmp_path / "machine")
    student = run / "student"
    if known_by == "training config":
        stage = json.loads((student / "stage.json").read_text())
        _edit_json(student / "stage.json", config={**stage["config"], "model_name_or_path": "my-org/tiny-base"})
    else:
        snapshot = tmp_path / "hf" / "hub" / "models--my-org--tiny-base" / "snapshots" / ("0a1b" * 10)
        shutil.copytree(json.loads((student / "adapter_config.json").read_text())["base_model_name_or_path"], snapshot)
        _edit_json(student / "adapter_config.json", base_model_name_or_path=str(snapshot))
        stage = json.loads((student / "stage.json").read_text())
        _edit_json(student / "stage.json", config={**stage["config"], "model_name_or_path": str(snapshot)})
    original = (student / "adapter_config.json").read_bytes()

    out = tmp_path / "staged"
    assert main(["push", str(run), "--repo-id", REPO_ID, "--dry-run", "--out", str(out)]) == 0
    staged = json.loads((out / "adapter_config.json").read_text())
    assert staged["base_model_name_or_path"] == "my-org/tiny-base"
    assert {k: v for k, v in staged.items() if k != "base_model_name_or_path"} == {"peft_type": "LORA", "r": 4}
    assert ModelCard((out / "README.md").read_text()).data.base_model == "my-org/tiny-base"
    assert (student / "adapter_config.json").read_bytes() == original

    monkeypatch.setenv("HF_TOKEN", fake_token())
    assert main(["push", str(run), "--repo-id", REPO_ID]) == 0
    assert json.loads(hub.uploaded["adapter_config.json"])["base_model_name_or_path"] == "my-org/tiny-base"
    assert hub.uploaded["README.md"] == (out / "README.md").read_bytes()
    assert (student / "adapter_config.json").read_bytes() == original
