"""Run one `align-distill train <method>`: parse → `module.main` → record the run next to the model → publish when
the recipe asks (`push_to_hub: true`). The CLI's `train` and the pipeline's `train` stages both go through
`run_method`, so a model trained either way carries the same run record.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import align_distill
from align_distill.redaction import redact
from align_distill.run_files import RUN_RECORD

FRAMEWORKS = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")

Publish = Callable[..., Any]
"""`hub.push_run(path, repo_id, private=, revision=, token=)`: passed in by the caller (hub sits above methods)."""


@dataclass
class PushRequest:
    """A recipe's `push_to_hub` settings, taken from the training arguments before the Trainer sees them."""

    repo_id: str
    private: bool
    revision: str | None
    token: str | None

    @classmethod
    def take_from(cls, training_args: Any) -> PushRequest | None:
        """The request, or None; turns the Trainer's own push off (it would upload training_args.bin and its
        own card, and create the repo before training)."""
        if not getattr(training_args, "push_to_hub", False):
            return None
        repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
        request = cls(
            repo_id=repo_id,
            private=bool(getattr(training_args, "hub_private_repo", False)),
            revision=getattr(training_args, "hub_revision", None),
            token=getattr(training_args, "hub_token", None),
        )
        training_args.push_to_hub = False
        return request


def record_training_run(output_dir: str | Path, method: str, parsed: Sequence[Any], result: Any = None) -> Path:
    """Write `<output_dir>/align_distill_run.json`: the method, the arguments the run set (`set_fields`, secrets
    redacted) and the training metrics, so that a plain `align-distill train` output is published with a full card."""
    args = {type(v).__name__: set_fields(v) for v in parsed if dataclasses.is_dataclass(v)}
    args = json.loads(json.dumps(redact(args), default=str))
    record = {
        "method": method,
        "align_distill_version": align_distill.__version__,
        "args": args,
        "result": redact(result),
        "framework_versions": framework_versions(),
    }
    path = Path(output_dir) / RUN_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def framework_versions() -> dict[str, str]:
    """The installed versions of the libraries a run depends on (those installed), for the run record and card."""
    found = {"align-distill": align_distill.__version__}
    for name in FRAMEWORKS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def set_fields(values: Any) -> dict[str, Any]:
    """The fields of a dataclass instance that differ from their defaults (what the recipe set, plus values that
    `__post_init__` resolved, such as `bf16`), enums as their values."""
    changed = {}
    for f in dataclasses.fields(values):
        if not f.init or not hasattr(values, f.name):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        value = getattr(values, f.name)
        if value != default:
            changed[f.name] = value.value if isinstance(value, Enum) else value
    return changed


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_method(method: str, module: Any, parsed: Sequence[Any], publish: Publish | None = None) -> Any:
    """Run `module.main(*parsed)`, record the run next to the model, and publish it when the recipe says
    `push_to_hub: true` (`hub_model_id`, `hub_private_repo`, `hub_revision`; token from `hub_token` / HF_TOKEN /
    login). The Trainer's own push is turned off: align-distill uploads the model, tokenizer and its card once,
    from the main process, after the final save."""
    training_args = next((a for a in parsed if hasattr(a, "output_dir") and hasattr(a, "push_to_hub")), None)
    request = PushRequest.take_from(training_args) if training_args is not None else None
    if training_args is not None and getattr(training_args, "hub_token", None) is not None:
        # the Trainer pickles its arguments into training_args.bin (output folder and every checkpoint): the token
        # lives on in the push request only, so that no file the run writes holds it
        training_args.hub_token = None
    result = module.main(*parsed)
    if training_args is None or not _is_main_process():
        return result
    record_training_run(training_args.output_dir, method, parsed, result)
    if request is not None:
        if publish is None:
            raise ValueError(f"{method}: push_to_hub is set but this caller cannot publish; use `align-distill push`")
        publish(
            training_args.output_dir,
            request.repo_id,
            private=request.private,
            revision=request.revision,
            token=request.token,
        )
    return result
