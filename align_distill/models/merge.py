"""Fold a LoRA adapter into its base model: `align-distill models merge ADAPTER OUT [--base PATH] [--dtype D]`."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from peft import PeftModel

from align_distill.run_files import EVAL_FILE, RUN_RECORD

from .loading import check_adapter_weights, load_model, load_tokenizer


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None, dtype: str = "auto") -> Path:
    """Fold a LoRA adapter into its base model and save full safetensors weights + tokenizer to `out_dir`.

    `base` overrides the adapter's `base_model_name_or_path` (e.g. when the base folder moved). The folder is
    written to a temporary name and renamed, so `out_dir` is either complete or absent.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new folder for the merged model")
    base = base or json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_path} names no base_model_name_or_path; pass the base model explicitly")
    check_adapter_weights(adapter_dir)
    model = PeftModel.from_pretrained(load_model(base, dtype=dtype), str(adapter_dir), use_safetensors=True)
    merged = model.merge_and_unload()
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial, safe_serialization=True)
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base
    load_tokenizer(tokenizer_source).save_pretrained(partial)
    for name in (RUN_RECORD, EVAL_FILE):  # provenance travels with the merged weights
        if (adapter_dir / name).exists():
            shutil.copy2(adapter_dir / name, partial / name)
    os.replace(partial, out_dir)
    return out_dir


def merge_command(adapter: str, out: str, base: str | None = None, dtype: str = "auto") -> int:
    """`align-distill models merge ADAPTER OUT [--base PATH] [--dtype D]`."""
    try:
        path = merge_adapter(adapter, out, base=base, dtype=dtype)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"merged {adapter} into {path}")
    return 0
