"""What every distillation trainer shares: response-aligned views of logits, per-row signals scattered onto the
batch, and frozen teachers prepared for the accelerator (ZeRO-3 included) the way TRL prepares reference models.

Position convention (every loss in `align_distill.losses`): a causal LM's logits at position i predict token i+1,
so for `input_ids [B, L]` with `completion_mask [B, L]` (1 on response tokens) the aligned view is
`logits[:, :-1]`, `labels = input_ids[:, 1:]`, `mask = completion_mask[:, 1:]`: position t predicts label t, and
the mask counts exactly the response tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers.integrations import deepspeed as hf_deepspeed
from trl.models.utils import prepare_deepspeed
from trl.trainer.utils import pad


def response_view(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(logits [B, L-1, V], labels [B, L-1], mask [B, L-1] bool)` aligned so that position t predicts label t."""
    if logits.shape[:2] != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)} and completion_mask "
            f"{tuple(completion_mask.shape)} must agree on [B, L]"
        )
    return logits[:, :-1], input_ids[:, 1:], completion_mask[:, 1:].bool()


def right_padded_batch(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """`input_ids` / `attention_mask` / `completion_mask` `[B, L]`, right-padded, for (prompt ids, response ids)
    pairs (each cut at `max_length` when given): the batch layout every on-policy and response-level trainer trains
    on."""
    cut = slice(None, max_length)
    ids = [torch.tensor((list(p) + list(r))[cut], dtype=torch.long) for p, r in sequences]
    completion = [torch.tensor(([0] * len(p) + [1] * len(r))[cut], dtype=torch.long) for p, r in sequences]
    return {
        "input_ids": pad(ids, padding_value=pad_token_id, padding_side="right"),
        "attention_mask": pad([torch.ones_like(x) for x in ids], padding_value=0, padding_side="right"),
        "completion_mask": pad(completion, padding_value=0, padding_side="right"),
    }


def record_metrics(trainer: Any, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Log each value averaged over processes in the trainer's TRL metrics (train or eval, as the model's mode);
    returns the averaged values."""
    mode = "train" if trainer.model.training else "eval"
    averaged = {}
    for key, value in values.items():
        averaged[key] = trainer.accelerator.gather(value.detach().float().reshape(1)).mean().item()
        trainer._metrics[mode][key].append(averaged[key])
    return averaged


class LossOnlyPrediction:
    """Evaluation through `compute_loss` alone, for trainers whose loss builds its own batch (rollouts, teacher
    signals) and returns no logits worth keeping. Mix in before the TRL trainer class."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def gather_rows(values: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of `scatter_rows` (`teachers.signals`): the response positions of each row, `[n_b, ...]`."""
    return [values[b][mask[b]] for b in range(mask.shape[0])]


def prepare_frozen(model: torch.nn.Module, accelerator: Any, is_deepspeed: bool) -> torch.nn.Module:
    """Put a frozen teacher/reference on the trainer's devices: under DeepSpeed it becomes an inference engine
    (sharded under ZeRO-3, like TRL's reference model); otherwise an eval-mode model on the accelerator's device."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if is_deepspeed:
        return prepare_deepspeed(model, accelerator)
    return accelerator.prepare_model(model, evaluation_mode=True)


@torch.no_grad()
def frozen_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of a frozen model (no graph kept)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


# ---- whole weights under ZeRO-3 (rollout / sampling copies of the student) ------------------------------------------


def gathered(params: list[torch.nn.Parameter], zero3: bool):
    """Under ZeRO-3, gather `params` whole for the block (collective: every rank must enter); else nothing."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed  # optional, heavy: only under ZeRO-3

    return deepspeed.zero.GatheredParameters(params)


@contextlib.contextmanager
def without_zero3_init():
    """Under a ZeRO-3 Trainer, transformers builds every new model partitioned (`deepspeed.zero.Init`); a rollout
    copy (AlignDistil's rollouts, CycleAlign's sampler) must be whole. transformers keeps the active DeepSpeed
    config in a module global: hide it meanwhile."""

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def student_weights(model: torch.nn.Module, zero3: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The student's full weights as `(name, tensor)` under the names of the plain (non-PEFT) model.

    ZeRO-3 parameters are gathered one at a time (all ranks must iterate: gathering is collective). A LoRA student
    is merged for the duration (gathered at once, as merging needs every shard) and unmerged afterwards. A weight
    shared by two modules (a tied embedding and LM head) is yielded under both names.
    """

    if is_peft_model(model):
        with gathered(list(model.parameters()), zero3):
            model.merge_adapter()
            try:
                for name, param in model.named_parameters(remove_duplicate=False):
                    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                    if model.prefix in name or "original_module" in name:
                        continue  # adapter weights (merged already) / the copy a modules_to_save replaces
                    yield name.replace("modules_to_save.default.", ""), param.data
            finally:
                model.unmerge_adapter()
        return
    # remove_duplicate=False: a tied LM head is yielded under its own name too. vLLM's CPU path keeps a packed copy
    # of the head that only a weight sent under the head's name refreshes (measured: without it the engine scores
    # with the old head after the embedding trained).
    for name, param in model.named_parameters(remove_duplicate=False):
        with gathered([param], zero3):
            yield name, param.data


def default_precision(config: Any) -> None:
    """Resolve `bf16=None` to bf16 only where it helps (a CUDA device that supports it), not TRL's "always".

    On CPU bf16 autocast is slower than fp32 and changes results, so a recipe that says nothing trains in fp32.
    """
    if getattr(config, "bf16", None) is None:
        config.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not getattr(
            config, "fp16", False
        )


# Fields of TRL's `DPOConfig` that only shape DPO's own loss, and those that sync its reference model: a trainer that
# replaces that loss or that reference lists them in its config's `ignored_fields`.
DPO_LOSS_OPTIONS = (
    "loss_weights",
    "ld_alpha",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "label_smoothing",
    "discopop_tau",
    "use_weighting",
)
DPO_REFERENCE_SYNC = ("sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps")
