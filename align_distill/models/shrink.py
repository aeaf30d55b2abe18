"""A compressed student made by dropping decoder layers of a larger model (Llama/Qwen2/Mistral layout).

Starting a student from a subset of the teacher's layers (rather than random weights) keeps embeddings, norms and
head aligned with the teacher, which makes distillation converge much faster.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from align_distill.models.loading import (
    check_output_folder,
    load_model,
    load_tokenizer,
    resolve_source,
    write_model_folder,
)

# Config fields holding one entry per layer: sliced with the kept layers.
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")
# Config fields holding layer indices: kept indices renumbered, dropped ones removed.
LAYER_INDEX_LISTS = ("mlp_only_layers",)


def parse_layer_spec(spec: str) -> list[int]:
    """ "0,1,5" or "0-3,7" -> [0, 1, 5] / [0, 1, 2, 3, 7]; order is kept so that validation can report it."""
    layers: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                if first > last:
                    raise ValueError
                layers.extend(range(first, last + 1))
            else:
                layers.append(int(part))
        except ValueError:
            raise ValueError(
                f"layer spec {spec!r}: cannot read {part!r}; expected comma-separated indices or ranges like '0-3,7'"
            ) from None
    return layers


def validate_keep_layers(keep_layers: list[int], num_layers: int) -> list[int]:
    """Indices must be in range, unique and increasing (a reordered stack is not a shrunk model)."""
    keep = list(keep_layers)
    if not keep:
        raise ValueError(f"keep_layers is empty; keep at least one of the model's {num_layers} layers")
    bad = [i for i in keep if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"keep_layers {keep}: {bad} out of range; the model has layers 0..{num_layers - 1}")
    dupes = sorted({i for i in keep if keep.count(i) > 1})
    if dupes:
        raise ValueError(f"keep_layers {keep}: layers {dupes} appear more than once")
    if keep != sorted(keep):
        raise ValueError(f"keep_layers {keep}: indices must be in increasing order, e.g. {sorted(keep)}")
    return keep


def _decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"shrink_model supports decoder stacks at `model.model.layers` (Llama, Qwen2, Mistral, ...); "
            f"{type(model).__name__} has none"
        )
    return layers


def _update_config(config, keep: list[int]) -> None:
    """Keep per-layer config fields in step with the kept layers, so a reload builds the same stack."""
    old = config.num_hidden_layers
    config.num_hidden_layers = len(keep)
    for name in PER_LAYER_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == old:
            setattr(config, name, [values[i] for i in keep])
    for name in LAYER_INDEX_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, list):
            setattr(config, name, [keep.index(i) for i in values if i in keep])
    # Qwen2-style threshold: layers at index >= max_window_layers use sliding attention. Kept layers are sorted,
    # so the kept layers below the old threshold are exactly the new first ones.
    threshold = getattr(config, "max_window_layers", None)
    if isinstance(threshold, int):
        config.max_window_layers = sum(1 for i in keep if i < threshold)


def _renumber(layer: nn.Module, new_idx: int) -> None:
    """Attention modules index the KV cache by `layer_idx`; a gap in the numbering would break generation."""
    for module in layer.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = new_idx


def shrink_model(
    model_or_path: PreTrainedModel | str | os.PathLike,
    keep_layers: list[int],
    out_dir: str | os.PathLike | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """Return a copy of the model with only `keep_layers`; save it (with the tokenizer) to `out_dir` if given.

    A model passed in is left untouched: only the kept layers and the non-layer modules are copied, so peak memory
    is the input plus the result, not twice the input. From a path, the tokenizer is read from the same folder.
    """
    if out_dir is not None:
        check_output_folder(out_dir)
    loaded_here = not isinstance(model_or_path, PreTrainedModel)
    if loaded_here:
        source = load_model(model_or_path, dtype="auto")
        folder = Path(resolve_source(model_or_path))
        has_tokenizer = not folder.is_dir() or any(folder.glob("tokenizer*"))
        if tokenizer is None and has_tokenizer:
            tokenizer = load_tokenizer(model_or_path)
    else:
        source = model_or_path
    layers = _decoder_layers(source)
    keep = validate_keep_layers(keep_layers, len(layers))

    if loaded_here:  # nobody else holds this model: drop layers in place
        shrunk = source
        shrunk.model.layers = nn.ModuleList(layers[i] for i in keep)
    else:
        # One memo for shell and layers: the config (referenced from attention modules too) and tied weights are
        # copied once and stay shared, as in the original.
        memo: dict[int, object] = {}
        source.model.layers = nn.ModuleList()
        try:
            shrunk = copy.deepcopy(source, memo)
        finally:
            source.model.layers = layers
        shrunk.model.layers = nn.ModuleList(copy.deepcopy(layers[i], memo) for i in keep)
    for new_idx, layer in enumerate(shrunk.model.layers):
        _renumber(layer, new_idx)
    _update_config(shrunk.config, keep)

    if out_dir is not None:
        with write_model_folder(out_dir) as tmp:
            shrunk.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    return shrunk


def shrink_command(path: str, out_dir: str, keep_layers: str) -> int:
    """`align-distill shrink PATH OUT_DIR --keep-layers 0-3,7`: exit code 0 on success, 1 with a message if not."""
    try:
        keep = parse_layer_spec(keep_layers)
        model = shrink_model(path, keep, out_dir)
    except (ValueError, TypeError, OSError) as error:
        print(f"align-distill shrink: error: {error}", file=sys.stderr)
        return 1
    params = sum(p.numel() for p in model.parameters())
    print(f"kept layers {keep} ({len(keep)} layers, {params:,} parameters) -> {out_dir}")
    return 0
