"""Load students, teachers and references the same way everywhere: safetensors only, no remote code unless asked.

Checks run before transformers is called, so a typo in a local path or an offline hub id fails at once with a
message that names the path, instead of after a hub lookup (or a timeout) with a generic one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from align_distill.errors import UserError

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# "name" or "org/name" with hub-legal characters; anything else (absolute, ./, ~, deeper paths) is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class SafetensorsRequiredError(OSError):
    """A checkpoint folder holds only pickle weights (pytorch_model.bin), which we refuse to unpickle."""


@dataclass
class LoraSettings:
    """LoRA knobs, mirroring TRL `ModelConfig` (`lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`).

    `target_modules=None` lets PEFT pick its default for the architecture (as TRL does); "all-linear" targets
    every linear layer except the output head.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    task_type: str = "CAUSAL_LM"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model_config(cls, model_config: Any) -> LoraSettings | None:
        """Read TRL's `ModelConfig` (or anything with its field names); None when `use_peft` is off."""
        if not getattr(model_config, "use_peft", False):
            return None
        return cls(
            r=model_config.lora_r,
            alpha=model_config.lora_alpha,
            dropout=model_config.lora_dropout,
            target_modules=model_config.lora_target_modules,
            modules_to_save=getattr(model_config, "lora_modules_to_save", None),
            task_type=getattr(model_config, "lora_task_type", "CAUSAL_LM"),
        )

    def to_peft_config(self):
        """The equivalent `peft.LoraConfig` (bias off, as in TRL's `get_peft_config`)."""

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            task_type=self.task_type,
            bias="none",
            **self.extra,
        )


def _offline() -> bool:
    """Read the env at call time: huggingface_hub freezes HF_HUB_OFFLINE at import, tests and users set it later."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model or tokenizer path that is neither a local folder nor a reachable hub id: the user's to fix."""


def resolve_source(path: str | os.PathLike, revision: str | None = None, what: str = "model") -> str:
    """Return `path` as transformers should receive it, or raise ModelNotFoundError before any hub lookup.

    A local-looking path must exist. A hub id is passed through, unless the hub is offline and the id is not in
    the local cache, which would otherwise surface as a generic connection error deep inside transformers.
    """
    text = os.fspath(path)
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelNotFoundError(f"{what} path {text!r} is a file; expected a folder with config and weights")
        return str(local)
    if not _HUB_ID.match(text):
        raise ModelNotFoundError(f"{what} folder {text!r} does not exist (resolved to {local.resolve()})")
    if _offline() and not _in_hub_cache(text, revision):
        raise ModelNotFoundError(
            f"{what} {text!r} is not a local folder (checked {local.resolve()}) and, with HF_HUB_OFFLINE=1, "
            f"a hub id must already be in the local cache (revision {revision or 'main'!r}); it is not. "
            "Download it first, or pass a local folder."
        )
    return text


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an id the hub would reject is not cached either
        return False
    return isinstance(found, str)


def _require_safetensors(folder: Path) -> None:
    """Refuse pickle-only folders with a message saying why, instead of transformers' bare 'no file named'."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise SafetensorsRequiredError(
            f"model folder {str(folder)!r} has only pickle weights ({', '.join(pickles)}); align-distill loads "
            "safetensors only, because unpickling a checkpoint can run arbitrary code. Convert it once, e.g. "
            "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)` in a trusted environment."
        )
    if (folder / "config.json").exists():
        raise SafetensorsRequiredError(f"model folder {str(folder)!r} has a config.json but no *.safetensors weights")


def check_weights(path: str | os.PathLike, revision: str | None = None, what: str = "model") -> str:
    """The one loading policy, called by every loader (`load_model`, the transformers and vLLM backends, the
    reward-model judge, `models merge`): resolve the source (clear path errors before any hub lookup) and refuse a
    local folder without safetensors weights. Returns the source to hand to the loader with `loading_kwargs()`
    (transformers) or `vllm_loading_kwargs()` (vLLM), which enforce the same rule for hub ids."""
    source = resolve_source(path, revision, what=what)
    if Path(source).is_dir():
        _require_safetensors(Path(source))
    return source


def loading_kwargs(trust_remote_code: bool = False, revision: str | None = None) -> dict[str, Any]:
    """`from_pretrained` arguments of the policy: safetensors only, remote code only when asked."""
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    return kwargs


def vllm_loading_kwargs(
    engine_kwargs: dict[str, Any] | None = None, trust_remote_code: bool = False, revision: str | None = None
) -> dict[str, Any]:
    """`vllm.LLM` arguments of the policy: `engine_kwargs` with `load_format="safetensors"` and
    `trust_remote_code` set. An explicit `load_format` other than safetensors (or vLLM's "auto", which would fall
    back to pickle files) is an error."""
    kwargs = dict(engine_kwargs or {})
    load_format = kwargs.pop("load_format", "safetensors")
    if load_format not in ("safetensors", "auto"):
        raise ValueError(
            f"vLLM load_format={load_format!r} is refused: align-distill loads safetensors only, because "
            "unpickling a checkpoint can run arbitrary code (omit load_format, or convert the checkpoint)"
        )
    kwargs.update(load_format="safetensors", trust_remote_code=trust_remote_code)
    if revision is not None:
        kwargs["revision"] = revision
    return kwargs


def check_adapter_weights(folder: str | os.PathLike) -> None:
    """The policy for a PEFT adapter folder: `adapter_model.safetensors`, never a pickled `adapter_model.bin`."""
    folder = Path(folder)
    if (folder / "adapter_model.safetensors").exists():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    raise SafetensorsRequiredError(
        f"adapter folder {str(folder)!r} has no adapter_model.safetensors"
        + (f", only pickle weights ({', '.join(pickles)})" if pickles else "")
        + "; align-distill loads safetensors only, because unpickling a checkpoint can run arbitrary code"
    )


def load_tokenizer(
    path: str | os.PathLike,
    trust_remote_code: bool = False,
    revision: str | None = None,
    what: str = "tokenizer",
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad: batches in every method are padded, many tokenizers ship no pad.

    A missing pad token becomes the EOS token (the TRL convention); the attention mask keeps it out of the loss.
    `what` names the path in errors ("model" when the tokenizer is read from a model folder).
    """
    source = resolve_source(path, revision, what=what)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer at {os.fspath(path)!r} has neither a pad token nor an EOS token to pad with; "
                "set `tokenizer.pad_token` before training"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str | os.PathLike,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    model_class: type = AutoModelForCausalLM,
    device_map: str | dict | None = None,
    peft_config: Any = None,
    frozen: bool = False,
) -> PreTrainedModel:
    """Load a model from safetensors; `frozen=True` for teachers and references, `peft_config` for a LoRA student.

    `peft_config` is a `peft.PeftConfig` or a `LoraSettings`. A frozen model with an adapter makes no sense (the
    adapter would not train), so that combination is an error.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    if frozen and peft_config is not None:
        raise ValueError("load_model: frozen=True and a peft_config were both given; a frozen model trains no adapter")
    source = check_weights(path, revision, what="model")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], **loading_kwargs(trust_remote_code, revision)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = model_class.from_pretrained(source, **kwargs)

    if peft_config is not None:
        if isinstance(peft_config, LoraSettings):
            peft_config = peft_config.to_peft_config()
        model = get_peft_model(model, peft_config)
    if frozen:
        freeze(model)
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (no dropout) and no gradients: what a teacher or reference model needs, in place."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def check_output_folder(out_dir: str | os.PathLike) -> None:
    """Fail before hours of work, not after: an existing non-empty output folder is never replaced silently."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder {str(out)!r} already exists and is not empty; choose a new folder")


@contextmanager
def write_model_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out_dir`, renamed to `out_dir` only when the block succeeds.

    A crash or error mid-save leaves no half-written model behind that a later `load_model` would half-read.
    An existing non-empty `out_dir` is an error unless `overwrite`, so a typo cannot replace a trained model.
    """
    out = Path(out_dir).expanduser()
    if not overwrite:
        check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
