"""Publish a trained student: `align-distill push RUN_DIR --repo-id ORG/NAME`, `push_to_hub: true` in a recipe, a
pipeline `call` stage.

What is uploaded: the adapter (adapter_config.json + adapter_model.safetensors) or the model (config, safetensors
weights), the tokenizer / processor files, `README.md` (the model card, `align_distill.model_card`) and
`align_distill.json` (the provenance record behind the card). Nothing else: no `training_args.bin` (a pickle that
can hold a hub token), no checkpoints, no optimizer states.

The token comes from `HF_TOKEN` (or a recipe's `hub_token`) or the stored `huggingface-cli login`; it goes to
`huggingface_hub.HfApi` and nowhere else: logs, the card, the uploaded files and error messages are scrubbed of it.
`align-distill push --dry-run` (`write_dry_run`) writes the upload folder locally instead: no network, no token.

An adapter's `base_model_name_or_path` must name a hub id in the upload (`adapter_base`): `--base-model`, else the
recorded value when it is one, else the hub id the run records for the local base folder; with none of these the push
(and the dry run) is refused before anything is staged. Only the staged copy of adapter_config.json is rewritten.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import huggingface_hub

from align_distill.errors import UserError
from align_distill.model_card import render_card
from align_distill.provenance import (
    ProvenanceError,
    Run,
    base_hub_id,
    collect_provenance,
    find_model,
    is_hub_id,
    publicize,
)
from align_distill.redaction import scrub
from align_distill.run_files import PROVENANCE_FILE

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = (
    *("adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json"),
    *("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"),
)
TOKENIZER_PATTERNS = (
    *("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model"),
    *("vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json"),
    *("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json"),
)


class PushError(UserError, RuntimeError):
    """Publishing failed; the message never contains the token."""


# -- secrets ------------------------------------------------------------------------------------------------------
def resolve_token(explicit: str | None = None) -> str | None:
    """The hub token: an explicit one (a recipe's `hub_token`), else HF_TOKEN, else the stored login."""
    if explicit:
        return explicit
    return os.environ.get("HF_TOKEN") or huggingface_hub.get_token()


# -- what gets uploaded ------------------------------------------------------------------------------------------
def publishable_files(model_dir: Path) -> list[str]:
    """Names of the weight and tokenizer files of `model_dir` that are uploaded (see the module docstring)."""
    names = sorted(p.name for p in model_dir.iterdir() if p.is_file())
    chosen = [n for n in names if any(fnmatch(n, pattern) for pattern in WEIGHT_PATTERNS + TOKENIZER_PATTERNS)]
    if not any(n.endswith(".safetensors") for n in chosen):
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
        raise PushError(
            f"{model_dir}: no safetensors weights to publish"
            + (f" (found only pickle files {pickles}; align-distill publishes safetensors only)" if pickles else "")
        )
    return chosen


@dataclass
class Publication:
    """What one push uploads, checked before anything is written: the model folder, its files, the provenance
    record and, for an adapter, the hub id its staged adapter_config.json names as the base (None: as recorded)."""

    model_dir: Path
    run: Run
    files: list[str]
    provenance: dict[str, Any]
    base_model: str | None = None


def prepare_publication(path: str | Path, stage: str | None = None, base_model: str | None = None) -> Publication:
    """Every check of a push (a model, safetensors weights, an adapter base a downloader can load), nothing
    written, so that a refused push or dry run leaves no half-staged folder behind."""
    model_dir, run, _ = find_model(path, stage)
    provenance = collect_provenance(path, stage)
    files = publishable_files(model_dir)
    publication = Publication(model_dir, run, files, provenance)
    if provenance["format"] == "adapter":
        publication.base_model = adapter_base(model_dir / "adapter_config.json", provenance, base_model)
    return publication


def adapter_base(config_path: Path, provenance: dict[str, Any], base_model: str | None = None) -> str | None:
    """The hub id the published adapter names as its base: `base_model` (`--base-model`), else the recorded
    `base_model_name_or_path` when it is a hub id (None: kept as is), else the hub id the run records for that local
    folder (`provenance.base_hub_id`). A local folder nobody downloading the adapter has, with no hub id known, is
    refused: the published adapter would not load anywhere else."""
    if base_model is not None:
        if not is_hub_id(base_model):
            raise PushError(f"--base-model {base_model!r} is not a hub id; give the base model's id, e.g. ORG/NAME")
        return base_model
    try:
        recorded = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as error:
        raise PushError(f"{config_path}: unreadable adapter config ({error})") from None
    if is_hub_id(recorded):
        return None
    known = base_hub_id(provenance, recorded if isinstance(recorded, str) else "")
    if known is not None:
        logger.info(
            "the adapter's base %s is a local copy of %s: the published adapter names the hub id", recorded, known
        )
        return known
    found = f"is the local folder {recorded}" if isinstance(recorded, str) and recorded else "is not set"
    raise PushError(
        f"{config_path}: the adapter's base_model_name_or_path {found}, and the run records no hub id for it; pass "
        "--base-model HUB_ID (the base model's id on the hub) so that the published adapter loads anywhere"
    )


def stage_publication(
    path: str | Path,
    repo_id: str,
    out: Path,
    stage: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    link: bool = True,
) -> dict[str, Any]:
    """Fill `out` with exactly what is uploaded (the weights, the card, the record); returns the record.

    `base_model` (a hub id) replaces an adapter's `base_model_name_or_path`, which after local training is a local
    folder that nobody downloading the adapter has (see `adapter_base`). `license`: the card's license (an SPDX /
    hub license id). `link`: hard-link the weights (a temporary upload folder) instead of copying them (a dry run's
    folder, which the user may edit without writing through into the run)."""
    return write_publication(prepare_publication(path, stage, base_model), repo_id, out, license, link)


def write_publication(
    publication: Publication, repo_id: str, out: Path, license: str | None = None, link: bool = True
) -> dict[str, Any]:
    """Write a checked `Publication` into `out` (see `stage_publication`); returns the record."""
    provenance = publication.provenance
    for name in publication.files:
        (_link_or_copy if link else shutil.copy2)(publication.model_dir / name, out / name)
    if provenance["format"] == "adapter":
        config = json.loads((out / "adapter_config.json").read_text())
        if publication.base_model is not None:
            config["base_model_name_or_path"] = publication.base_model
            (out / "adapter_config.json").unlink()  # a hard link: never write through it into the run folder
            (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        provenance["published_base_model"] = publicize(config.get("base_model_name_or_path"), publication.run)
    (out / "README.md").write_text(render_card(provenance, repo_id, license=license))
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    return provenance


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # no copy of multi-GB weights when the temp folder is on the same filesystem
    except OSError:
        shutil.copy2(source, target)


# -- pushing -----------------------------------------------------------------------------------------------------
def push_run(
    path: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    stage: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
) -> str:
    """Create (or reuse) `repo_id` and upload the student of `path` with its card; returns the commit URL.

    `path` is a pipeline run folder (its last finished training stage, or `stage`), one stage folder, or a training
    output folder. `revision` is a branch, created from main when missing. `base_model`, `license`: see
    `stage_publication`.
    """
    token = resolve_token(token)
    secrets = [token]
    try:
        with tempfile.TemporaryDirectory(prefix="align-distill-push-") as tmp:
            provenance = stage_publication(path, repo_id, Path(tmp), stage, base_model, license)
            files = sorted(p.name for p in Path(tmp).iterdir())
            target = f"{repo_id}@{revision}" if revision else repo_id
            logger.info("pushing %d files to %s: %s", len(files), target, ", ".join(files))
            api = huggingface_hub.HfApi(token=token, library_name="align-distill")
            # private=None leaves a new repository to the hub's (or the organisation's) default visibility
            api.create_repo(repo_id, private=True if private else None, repo_type="model", exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                repo_type="model",
                revision=revision,
                commit_message=commit_message or f"align-distill: {provenance['method']} student",
            )
    except ProvenanceError:  # nothing to publish: a local problem whose message holds paths only
        raise
    except PushError as error:
        raise PushError(scrub(str(error), secrets)) from None
    except Exception as error:  # hub, network and file errors alike: re-raised without the token, unchained
        logger.debug("push failed:\n%s", scrub(traceback.format_exc(), secrets))
        raise PushError(
            scrub(f"pushing {path} to {repo_id} failed: {type(error).__name__}: {error}", secrets)
        ) from None
    url = getattr(commit, "commit_url", None) or str(commit)
    logger.info("pushed to %s", scrub(url, secrets))
    return url


def write_dry_run(
    path: str | Path,
    repo_id: str,
    out: str | Path | None = None,
    stage: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
) -> Path:
    """Write exactly what `push_run` would upload (copies of the weights, the card, the record) into `out` (new or
    empty; default: a new temporary folder) and return it. No network, no token."""
    target = Path(out).expanduser() if out is not None else None
    if target is not None and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PushError(f"{target}: --out must be a new or empty folder")
    publication = prepare_publication(path, stage, base_model)  # a refused push stages nothing
    if target is None:
        target = Path(tempfile.mkdtemp(prefix="align-distill-push-dry-run-"))
    else:
        target.mkdir(parents=True, exist_ok=True)
    write_publication(publication, repo_id, target, license, link=False)
    return target


def push_command(
    run_dir: str,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    stage: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    dry_run: bool = False,
    out: str | None = None,
) -> int:
    """`align-distill push`: 0 when pushed (or staged, `dry_run`), 1 when the hub refused or failed, 2 when there is
    nothing to push. `dry_run` writes the upload folder to `out` instead (see `write_dry_run`)."""
    try:
        if dry_run:
            staged = write_dry_run(run_dir, repo_id, out, stage=stage, base_model=base_model, license=license)
        else:
            url = push_run(
                run_dir,
                repo_id,
                private=private,
                revision=revision,
                stage=stage,
                commit_message=commit_message,
                base_model=base_model,
                license=license,
            )
    except ProvenanceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if dry_run:
        files = sorted(p.name for p in staged.iterdir())
        print(f"dry run: nothing uploaded; what would be pushed to {repo_id} is in {staged}")
        print(f"  {len(files)} files: {', '.join(files)}")
        print(f"  model card: {staged / 'README.md'}")
        return 0
    print(f"pushed {run_dir} to {repo_id}: {url}")
    return 0


def push_stage(
    out: Path,
    model: str,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    base_model: str | None = None,
) -> dict:
    """Pipeline `call` stage: publish the stage folder `model` (e.g. "${dckd_student}") to `repo_id`; `base_model`
    as `--base-model` (an adapter trained on a local base folder the run has no hub id for needs it).

    - name: publish
      call: align_distill.hub:push_stage
      config: {model: "${dckd_student}", repo_id: my-org/student-dckd, private: true}
    """
    url = push_run(model, repo_id, private=private, revision=revision, base_model=base_model)
    return {"repo_id": repo_id, "url": url, "private": private, "revision": revision}
