"""AlignDistil (docs/methods/aligndistil.md): distil a synthesized token-level teacher into the student.

The teacher is built per token from two frozen models: the DPO model and the reverse-DPO model (trained on the
same pairs with chosen and rejected swapped), z* = z_dpo + α_t·(z_dpo − z_rev) with α_t = r·TVD_t + ε. The student
(initialised from the SFT model) minimises Σ_t β_t·KL(π_θ ‖ π*) with β_t = β0/α_t, over the full vocabulary.
All of that math is `align_distill.losses.aligndistil_loss`; this trainer only feeds it:

- **off-policy** (§5.2, Eq. 19): states are the dataset's *chosen* responses. Data handling is TRL's `SFTTrainer`
  (prompt/completion tokenization with the chat template, right padding, `labels = -100` outside the response).
- **on-policy** (§5.2, Eq. 18): states are fresh student samples. Each batch of prompts is rolled out through a
  `data_gen` backend (`transformers` on CPU, `vllm` colocated) whose weights are copied from the student every
  `rollout_sync_steps` optimizer steps (1 = fully on-policy, the official setting); the engine and its sync rule are
  `trainers.rollouts.RolloutEngine`, shared with KD's `rollout_backend: vllm`.

Positions (§5.3): the loss at response token t uses the logits row that *predicts* y_t (textbook, rows
P-1..P+|y|-2 for prompt length P; the same rows as `trainers.common.response_view`). `official_alignment=True`
scores the rows whose *input* is a response token (P..P+|y|-1), the released code's shifted mask, for parity runs.
Only the span of scored rows is projected through the LM heads (`logits_to_keep`), so prompt rows never become
`[*, V]` logits; by default (`fused_lm_head`) not even those: the three models stop at their final hidden states and
`fused_aligndistil_loss` projects the heads in vocabulary tiles.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from trl import SFTConfig, SFTTrainer

from align_distill.data.tokens import encode_prompt
from align_distill.data_gen.backends import SamplingParams
from align_distill.losses import aligndistil_loss, fused_aligndistil_loss, masked_mean
from align_distill.losses.divergence import default_chunk_size
from align_distill.models import check_model_vocab, load_model, shared_vocab_size
from align_distill.teachers.server import ServerTeacher
from align_distill.teachers.sources import SignalsRequest, canonical_kind
from align_distill.trainers.common import LossOnlyPrediction, default_precision, prepare_frozen, right_padded_batch
from align_distill.trainers.fused_heads import (
    FusedLMHeadConfig,
    FusedLMHeadMixin,
    HiddenHead,
    final_hidden,
    plain_lm_head,
)
from align_distill.trainers.rollouts import ENGINE_BACKENDS, RolloutEngine, rollout_seeds, zero3_enabled
from align_distill.vocabulary import reject_ignored_fields

logger = logging.getLogger(__name__)

VARIANTS = ("adaptive", "contrastive", "theorem1")
ROLLOUT_BACKENDS = ENGINE_BACKENDS
# Released scripts: `--beta2` (= tvd_scale) 10 off-policy, 15 on-policy (docs/methods/aligndistil.md §6.2).
DEFAULT_TVD_SCALE = {False: 10.0, True: 15.0}


@dataclass
class AlignDistilConfig(SFTConfig, FusedLMHeadConfig):
    r"""Configuration of [`AlignDistilTrainer`]: TRL's `SFTConfig` plus the AlignDistil teacher, loss and rollouts.

    Parameters:
        > Parameters that control the models

        teacher_model_name_or_path (`str`, *optional*):
            The DPO model (π_dpo, trained from the SFT model with β0). The official code calls it `--teacher_model`.
        reference_model_name_or_path (`str`, *optional*):
            The reverse-DPO model (π⁻_dpo: DPO with chosen and rejected swapped, same β0). The official code calls
            it `--ref_model`. For `variant="theorem1"` give the SFT reference model here instead.
        teacher_dtype (`str`, defaults to `"auto"`):
            dtype the two frozen models are loaded in when given as paths (`auto`, `float32`, `bfloat16`, ...).
        teacher_mode (`str`, defaults to `"model"`):
            Where the two teacher-side models run (docs/teachers.md). `model`: in this process. `server`: each on a
            vLLM server (`teacher_server_url`, `reference_server_url`), asked for its **full** distribution
            (`prompt_logprobs: V`; the servers need `--max-logprobs -1`): the AlignDistil loss reads both models'
            whole rows (TVD, the extrapolated teacher), and has no top-k form. `cache` is not supported (a cache at
            k = V holds V log-probs per token). `live` is the deprecated name of `model`.
        teacher_server_url (`str`, *optional*), teacher_server_model (`str`, *optional*):
            The DPO model's vLLM server and served name (`teacher_mode="server"`).
        reference_server_url (`str`, *optional*), reference_server_model (`str`, *optional*):
            The reverse-DPO (or, for `theorem1`, SFT) model's vLLM server and served name.
        teacher_server_kwargs (`dict`, *optional*):
            Client settings of both servers (`api_key_env`, `max_concurrency`, `timeout`, `max_retries`, ...).

        > Parameters that control the loss (docs/methods/aligndistil.md §4, §5, §8.1)

        beta (`float`, defaults to `0.1`):
            β0, the β the DPO and reverse-DPO models were trained with (must match them). β_t = beta/α_t.
        tvd_scale (`float`, *optional*):
            r in α_t = r·TVD_t + eps (the released scripts' `--beta2`). TVD is Σ_v|p_dpo − p_rev| ∈ [0, 2] (no ½);
            in the paper's ½ convention the same α needs r_paper = 2·tvd_scale. Defaults to 10 off-policy and 15
            on-policy, the released scripts' values.
        eps (`float`, defaults to `1e-3`):
            ε in α_t, the extrapolation floor where the two models agree.
        tvd_half (`bool`, defaults to `False`):
            Use the paper's ½·Σ|·| TVD instead of the code's Σ|·|.
        variant (`str`, defaults to `"adaptive"`):
            `adaptive` (released method), `contrastive` (fixed ratio: z* = z_dpo + ratio·(z_dpo − z_rev)) or
            `theorem1` (z* = ratio·z_dpo + (1 − ratio)·z_ref, with the SFT model as the second model).
        ratio (`float`, *optional*):
            Fixed extrapolation ratio β0/β of the `contrastive` and `theorem1` variants (their KL weight is β).
        official_alignment (`bool`, defaults to `False`):
            Score the rows whose input is a response token (P..P+|y|-1, the official code's shifted mask) instead of
            the rows that predict the response tokens (P-1..P+|y|-2). For parity runs only.
        loss_chunk_size (`int`, *optional*):
            Positions per chunk of the full-vocabulary loss; default about 16 MiB of float32 per intermediate.
        fused_lm_head (`bool`, defaults to `True`):
            The loss from the three models' final hidden states and LM heads (`fused_aligndistil_loss`): the heads
            are projected in vocabulary tiles, no `[rows, V]` logits exist, not even per block, and the statistics
            are the same. Taken when every LM head is a plain linear layer without logit scaling or soft-capping
            and the teachers run in this process; otherwise (and with `False`) the logits path below.
        blockwise_lm_head (`bool`, *optional*):
            The logits path's memory saver: project the three models' final hidden states to logits one block of
            scored rows at a time, so that no `[rows, V]` logits of the whole batch ever exist (the loss keeps only
            its per-row gradients). `None` (default): on when every LM head is a plain linear layer; `False`: the
            models' own forwards compute the logits of the scored span.

        > Parameters that control on-policy rollouts (docs/methods/aligndistil.md §5.2)

        on_policy (`bool`, defaults to `False`):
            Train on student samples for each batch's prompts instead of the dataset's chosen responses.
        rollout_backend (`str`, defaults to `"transformers"`):
            `transformers` (a copy of the student in this process) or `vllm` (a colocated vLLM engine).
        rollout_backend_kwargs (`dict`, *optional*):
            Keyword arguments for the backend (`data_gen.make_generator`), e.g. `{"dtype": "float32",
            "max_model_len": 256}` for vLLM, `{"batch_size": 64}` for transformers.
        rollout_sync_steps (`int`, defaults to `1`):
            Copy the student's weights into the rollout engine every this many optimizer steps (official: 1).
        max_completion_length (`int`, defaults to `1024`):
            Longest sampled response (official `generate_max_len`).
        temperature (`float`, defaults to `1.0`), top_p (`float`, defaults to `1.0`), top_k (`int`, defaults to `0`):
            Sampling settings (official: temperature 1, top-p 1).

    > [!NOTE]
    > Defaults changed from `SFTConfig`, to the released AlignDistil scripts (docs/methods/aligndistil.md §6.2):
    > `learning_rate=1e-6`, `lr_scheduler_type="cosine_with_min_lr"` with `min_lr_rate=0.1`, `warmup_steps=0.1`
    > (a ratio), `adam_beta2=0.95`, `max_length=2048`; and `bf16=None` means bf16 only on a CUDA device that
    > supports it.

    TRL fields the AlignDistil loss never reads (`loss_type`, `router_aux_loss_coef`, `label_smoothing_factor`) are
    rejected when set. Deprecated keys (one release): `dpo_model_path` → `teacher_model_name_or_path`,
    `rev_dpo_model_path` → `reference_model_name_or_path`, `max_new_tokens` → `max_completion_length`.
    """

    deprecated_aliases: ClassVar[dict[str, str]] = {
        "dpo_model_path": "teacher_model_name_or_path",
        "rev_dpo_model_path": "reference_model_name_or_path",
        "max_new_tokens": "max_completion_length",
    }
    ignored_fields: ClassVar[dict[str, str]] = {
        "loss_type": "the SFT loss is replaced by the AlignDistil loss",
        "label_smoothing_factor": "the SFT loss is replaced by the AlignDistil loss",
        "router_aux_loss_coef": "the AlignDistil loss has no MoE load-balancing term",
    }
    method_label: ClassVar[str] = "AlignDistil"

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["rollout_backend_kwargs", "teacher_server_kwargs"]

    # models
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "The DPO model (π_dpo)."})
    reference_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The reverse-DPO model (π⁻_dpo); the SFT model for variant=theorem1."}
    )
    teacher_dtype: str = field(default="auto", metadata={"help": "dtype of the two frozen models."})
    teacher_mode: Literal["model", "server", "live"] = field(
        default="model", metadata={"help": "model: both models in process; server: vLLM servers (full rows)."}
    )
    teacher_server_url: str | None = field(default=None, metadata={"help": "The DPO model's vLLM server (server)."})
    teacher_server_model: str | None = field(default=None, metadata={"help": "Its served model name."})
    reference_server_url: str | None = field(
        default=None, metadata={"help": "The reverse-DPO (theorem1: SFT) model's vLLM server (server)."}
    )
    reference_server_model: str | None = field(default=None, metadata={"help": "Its served model name."})
    teacher_server_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Client settings of both servers (api_key_env, timeout, max_retries, ...)."}
    )
    # loss
    beta: float = field(default=0.1, metadata={"help": "β0 of the DPO models; β_t = beta/α_t."})
    tvd_scale: float | None = field(
        default=None, metadata={"help": "r in α_t = r·TVD_t + eps (no ½ in TVD). Default 10 off-, 15 on-policy."}
    )
    eps: float = field(default=1e-3, metadata={"help": "ε in α_t = r·TVD_t + ε."})
    tvd_half: bool = field(default=False, metadata={"help": "Paper's ½·Σ|p_dpo − p_rev| TVD convention."})
    variant: str = field(default="adaptive", metadata={"help": "Teacher synthesis.", "choices": list(VARIANTS)})
    ratio: float | None = field(default=None, metadata={"help": "Fixed ratio β0/β of the constant variants."})
    official_alignment: bool = field(
        default=False, metadata={"help": "Score rows P..P+|y|-1 (official shifted mask) instead of P-1..P+|y|-2."}
    )
    loss_chunk_size: int | None = field(default=None, metadata={"help": "Positions per full-vocabulary chunk."})
    blockwise_lm_head: bool | None = field(
        default=None,
        metadata={"help": "Project scored rows to logits one block at a time (None: when the LM head allows)."},
    )
    # on-policy
    on_policy: bool = field(default=False, metadata={"help": "Train on student rollouts instead of chosen responses."})
    rollout_backend: str = field(
        default="transformers", metadata={"help": "Rollout engine.", "choices": list(ROLLOUT_BACKENDS)}
    )
    rollout_backend_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments of the rollout backend (JSON on the command line)."}
    )
    rollout_sync_steps: int = field(
        default=1, metadata={"help": "Copy student weights into the rollout engine every N optimizer steps."}
    )
    max_completion_length: int = field(default=1024, metadata={"help": "Longest sampled response in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of rollouts."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of rollouts."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of rollouts (0 = off)."})
    # changed defaults (released scripts)
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (released scripts: 1e-6)."})
    lr_scheduler_type: str = field(
        default="cosine_with_min_lr", metadata={"help": "Scheduler (released: cosine to 0.1·lr)."}
    )
    warmup_steps: float = field(default=0.1, metadata={"help": "Warmup steps, or a ratio of all steps if < 1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "Adam β2 (released scripts: 0.95)."})
    max_length: int | None = field(default=2048, metadata={"help": "Longest prompt + response (released: 2048)."})

    def __post_init__(self) -> None:
        default_precision(self)
        if self.tvd_scale is None:
            self.tvd_scale = DEFAULT_TVD_SCALE[bool(self.on_policy)]
        if self.lr_scheduler_type == "cosine_with_min_lr" and not self.lr_scheduler_kwargs:
            self.lr_scheduler_kwargs = {"min_lr_rate": 0.1}
        reject_ignored_fields(self)  # the values as given, before TRL resolves them
        super().__post_init__()
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {VARIANTS}, found {self.variant!r}")
        elif self.variant != "adaptive" and self.ratio is None:
            problems.append(f"variant {self.variant!r} needs a fixed `ratio` (β0/β), found None")
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            problems.append(f"rollout_backend must be one of {ROLLOUT_BACKENDS}, found {self.rollout_backend!r}")
        if self.rollout_sync_steps < 1:
            problems.append(f"rollout_sync_steps must be >= 1, found {self.rollout_sync_steps}")
        if self.beta <= 0 or self.eps <= 0:
            problems.append(f"beta and eps must be > 0, found beta={self.beta}, eps={self.eps}")
        self.teacher_mode = canonical_kind(self.teacher_mode, "AlignDistilConfig.teacher_mode")
        if isinstance(self.teacher_server_kwargs, str):
            self.teacher_server_kwargs = json.loads(self.teacher_server_kwargs)
        if self.teacher_mode == "cache":
            problems.append(
                "teacher_mode=cache is not supported: the AlignDistil loss reads both models' full rows (a cache at "
                "k = V); use teacher_mode=model or server"
            )
        elif self.teacher_mode == "server":
            missing = [f for f in ("teacher_server_url", "reference_server_url") if not getattr(self, f)]
            if missing:
                problems.append(f"teacher_mode=server needs {', '.join(missing)}")
            if self.official_alignment:
                problems.append(
                    "official_alignment scores a row past the last response token, which a server's prompt log-probs "
                    "do not cover; use it with teacher_mode=model"
                )
        if problems:
            raise ValueError("AlignDistilConfig: " + "; ".join(problems))


def scored_rows(completion_mask: torch.Tensor, official_alignment: bool = False) -> torch.Tensor:
    """`[B, L]` bool: which logits rows the loss scores, given the `[B, L]` response-token mask.

    Textbook (default): row i is scored when token i+1 is a response token, i.e. the row predicts it — the mask of
    `trainers.common.response_view`, padded with a False last column. Official: the response tokens' own rows.
    """
    completion_mask = completion_mask.bool()
    if official_alignment:
        return completion_mask
    rows = torch.zeros_like(completion_mask)
    rows[:, :-1] = completion_mask[:, 1:]
    return rows


def kept_positions(rows: torch.Tensor) -> torch.Tensor:
    """Indices of the smallest column span holding every scored row (`logits_to_keep` for the forwards)."""
    columns = rows.any(0).nonzero().flatten()
    if columns.numel() == 0:  # nothing to score: keep one row so the forward still has a graph
        return torch.zeros(1, dtype=torch.long, device=rows.device)
    return torch.arange(int(columns[0]), int(columns[-1]) + 1, device=rows.device)


# ---- data ---------------------------------------------------------------------------------------------------------


def as_prompt_completion(dataset: Any) -> Any:
    """Off-policy states: a preference dataset's chosen responses as TRL prompt/completion rows."""
    columns = dataset.column_names
    if "completion" in columns:
        return dataset.select_columns(["prompt", "completion"])
    if "chosen" not in columns:
        raise ValueError(f"off-policy AlignDistil needs prompt + chosen (or completion) columns, found {columns}")
    return dataset.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")


def collate_prompts(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """On-policy batches are prompts only; the trainer turns them into rollouts."""
    return {"prompts": [example["prompt"] for example in examples]}


# ---- loss of one batch --------------------------------------------------------------------------------------------


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor, vocab_size: int):
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep, use_cache=False
    )
    return out.logits[..., :vocab_size]  # a padded head's extra rows are no tokens


def _hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor):
    with final_hidden(model) as (captured, head):
        model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep, use_cache=False
        )
    return captured["hidden"], head


def _loss_settings(args: Any) -> dict[str, Any]:
    theorem1 = args.variant == "theorem1"
    return dict(
        beta0=args.beta,
        tvd_scale=args.tvd_scale,
        eps=args.eps,
        tvd_half=args.tvd_half,
        variant=args.variant,
        ratio=args.ratio,
        chunk_size=args.loss_chunk_size,
        return_stats=True,
    ), theorem1


def batch_loss(
    student: torch.nn.Module,
    dpo_model: torch.nn.Module,
    second_model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    args: Any,
    vocab_size: int,
    gather: Callable[..., None] | None = None,
    fused: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """AlignDistil loss of one right-padded batch: `(loss, stats, scored rows [B, L])`.

    `batch` holds `input_ids`, `attention_mask` and the response tokens as `completion_mask` (or SFT `labels`,
    -100 outside the response). `second_model` is the reverse-DPO model (the SFT reference for `theorem1`).
    `args` carries the loss settings of `AlignDistilConfig` (beta, tvd_scale, eps, tvd_half, variant, ratio,
    official_alignment, loss_chunk_size, fused_lm_head, blockwise_lm_head). The forwards project only the span of
    scored rows (`logits_to_keep`). Fused (`fused_lm_head`, plain heads, teachers in process) they project no row
    and `fused_aligndistil_loss` reads hidden states and heads; `gather(*HiddenHead)` (the trainer's ZeRO-3 head
    gather, held through the backward) is called first. `fused`: the trainer's decision (`_fused_ready`, which logs
    why a head takes the logits path); None decides here from `args` and the heads. Blockwise (see
    `AlignDistilConfig.blockwise_lm_head`) the logits are made here, one block of scored rows at a time, and reduced
    by `masked_mean` like the loss does.
    """
    if "completion_mask" in batch:
        completion_mask = batch["completion_mask"].bool()
    else:  # SFT tokenization: labels are -100 on prompt and padding
        completion_mask = batch["labels"] != -100
    rows = scored_rows(completion_mask & batch["attention_mask"].bool(), args.official_alignment)
    keep = kept_positions(rows)
    mask = rows[:, keep]
    settings, theorem1 = _loss_settings(args)
    models = (student, dpo_model, second_model)
    served = isinstance(dpo_model, ServerTeacher)
    plain = not served and all(plain_lm_head(m) for m in models)
    if fused is None:
        fused = getattr(args, "fused_lm_head", False) and plain
    if fused and mask.any():
        views = [_hidden_head(student, batch, keep, vocab_size)]
        with torch.no_grad():
            views += [_hidden_head(m, batch, keep, vocab_size) for m in models[1:]]
        if gather is not None:
            gather(*views)
        settings.pop("chunk_size")
        loss, stats = fused_aligndistil_loss(
            *(x for v in views for x in (v.hidden, v.weight)),
            mask,
            student_bias=views[0].bias,
            dpo_bias=views[1].bias,
            other_bias=views[2].bias,
            **settings,
        )
        return loss, stats, rows
    blockwise = getattr(args, "blockwise_lm_head", None)
    if blockwise is None:
        blockwise = plain
    if not blockwise or not mask.any():
        student_logits = _logits(student, batch, keep, vocab_size)
        with torch.no_grad():
            if served:  # full log-prob rows from the servers: valid logits of the same softmax
                dpo_logits, second_logits = (_served_rows(m, batch, completion_mask, keep) for m in models[1:])
            else:
                dpo_logits = _logits(dpo_model, batch, keep, vocab_size)
                second_logits = _logits(second_model, batch, keep, vocab_size)
        loss, stats = aligndistil_loss(
            student_logits,
            dpo_logits,
            None if theorem1 else second_logits,
            mask,
            ref_logits=second_logits if theorem1 else None,
            **settings,
        )
        return loss, stats, rows

    hidden, heads = zip(_hidden(student, batch, keep), *[_frozen_hidden(m, batch, keep) for m in models[1:]])
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    block = args.loss_chunk_size or default_chunk_size(vocab_size)
    values, stats = [], {}
    for start in range(0, b_idx.numel(), block):
        b, t = b_idx[start : start + block], t_idx[start : start + block]
        student_logits = heads[0](hidden[0][b, t])[None, :, :vocab_size]
        with torch.no_grad():
            dpo_logits, second_logits = (head(h[b, t])[None, :, :vocab_size] for h, head in zip(hidden[1:], heads[1:]))
        part, part_stats = aligndistil_loss(
            student_logits,
            dpo_logits,
            None if theorem1 else second_logits,
            torch.ones_like(b, dtype=torch.bool)[None],
            ref_logits=second_logits if theorem1 else None,
            reduction="none",
            **settings,
        )
        values.append(part[0])
        for key, value in part_stats.items():  # token means: weight each block by its share of the tokens
            stats[key] = stats.get(key, 0.0) + value * (b.numel() / b_idx.numel())
    per_token = torch.zeros(mask.shape, dtype=values[0].dtype, device=mask.device).index_put(
        (b_idx, t_idx), torch.cat(values)
    )
    return masked_mean(per_token, mask, "sequence_mean"), stats, rows


def _hidden_head(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor, vocab_size: int):
    """The fused path's view of one model: hidden states at the kept rows and its head, cut to the vocabulary."""
    hidden, head = _hidden(model, batch, keep)
    return HiddenHead(hidden, head.weight, head.bias, vocab_size)


def _served_rows(
    source: ServerTeacher, batch: dict[str, torch.Tensor], completion_mask: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """A served model's full log-prob rows `[B, |keep|, V]` at the kept rows (row i predicts token i + 1)."""
    request = SignalsRequest(
        [("", "completion")] * batch["input_ids"].shape[0],
        batch["input_ids"].cpu(),
        completion_mask.long().cpu(),
        batch["attention_mask"].cpu(),
    )
    signals = source.signals(request)
    rows = torch.zeros(*signals.ids.shape[:2], source.vocab_size).scatter_(
        -1, signals.ids.clamp(max=source.vocab_size - 1), signals.logprobs
    )
    rows = torch.cat([rows, rows.new_zeros(rows.shape[0], 1, rows.shape[-1])], dim=1)  # the last row predicts nothing
    return rows[:, keep.cpu()].to(batch["input_ids"].device)


def _frozen_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor):
    with torch.no_grad():
        return _hidden(model, batch, keep)


# ---- trainer ------------------------------------------------------------------------------------------------------


class AlignDistilTrainer(FusedLMHeadMixin, LossOnlyPrediction, SFTTrainer):
    """TRL `SFTTrainer` whose loss is AlignDistil's; see the module docstring.

    Args:
        model: the student (a path or a model), initialised from the SFT model.
        dpo_model, rev_dpo_model: the frozen DPO and reverse-DPO models (paths or models); default to
            `args.teacher_model_name_or_path` / `args.reference_model_name_or_path`. For `variant="theorem1"` the
            second is the SFT model.
        train_dataset: preference rows (prompt, chosen[, rejected]) or prompt/completion rows; on-policy only reads
            `prompt`.
        generator: an existing rollout `Generator` (on-policy); by default one is built on the first rollout.
    """

    _tag_names = ["trl", "align-distill", "aligndistil"]
    _name = "AlignDistil"
    loss_is_scaled_for_ga = False  # the loss is a per-batch mean: the Trainer divides it by accumulation steps

    def __init__(
        self,
        model: Any,
        dpo_model: Any = None,
        rev_dpo_model: Any = None,
        args: AlignDistilConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: list | None = None,
        generator: Any = None,
    ):
        if args is None:
            raise ValueError("AlignDistilTrainer needs an AlignDistilConfig (args)")
        dpo_model = dpo_model if dpo_model is not None else args.teacher_model_name_or_path
        rev_dpo_model = rev_dpo_model if rev_dpo_model is not None else args.reference_model_name_or_path
        if args.teacher_mode == "model" and (dpo_model is None or rev_dpo_model is None):
            raise ValueError(
                "AlignDistil needs the DPO model and the reverse-DPO model: set teacher_model_name_or_path and "
                f"reference_model_name_or_path (found {args.teacher_model_name_or_path!r}, "
                f"{args.reference_model_name_or_path!r})"
            )
        data_collator = None
        if args.on_policy:
            train_dataset = train_dataset.select_columns(["prompt"])
            eval_dataset = eval_dataset.select_columns(["prompt"]) if eval_dataset is not None else None
            args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
            data_collator = collate_prompts
        else:
            train_dataset = as_prompt_completion(train_dataset)
            eval_dataset = as_prompt_completion(eval_dataset) if eval_dataset is not None else None
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
        )

        self.vocab_size = shared_vocab_size(self._tokenizer)
        check_model_vocab(self.accelerator.unwrap_model(self.model), self._tokenizer, "student")
        if args.teacher_mode == "server":
            self.dpo_model, self.rev_dpo_model = (
                ServerTeacher(
                    getattr(args, f"{role}_server_url"),
                    self._tokenizer,
                    self.vocab_size,  # the full vocabulary: the loss reads whole rows
                    name=name,
                    model=getattr(args, f"{role}_server_model"),
                    client_kwargs=args.teacher_server_kwargs,
                )
                for role, name in (("teacher", "DPO model"), ("reference", "reverse-DPO model"))
            )
        else:
            self.dpo_model = self._frozen(dpo_model, "DPO model")
            self.rev_dpo_model = self._frozen(rev_dpo_model, "reverse-DPO model")
        self.rollouts = RolloutEngine(args, self._tokenizer, self.accelerator, generator)
        self._rollouts = 0

    def _frozen(self, model: Any, name: str) -> torch.nn.Module:

        if isinstance(model, str):
            model = load_model(
                model, dtype=self.args.teacher_dtype, trust_remote_code=self.args.trust_remote_code, frozen=True
            )
        check_model_vocab(model, self._tokenizer, name)
        return prepare_frozen(model, self.accelerator, self.is_deepspeed_enabled)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None and self.args.on_policy:
            self._signature_columns = ["prompt"]
        super()._set_signature_columns_if_needed()

    # -- rollouts ---------------------------------------------------------------------------------------------------
    @property
    def _zero3(self) -> bool:
        return zero3_enabled(self.accelerator, self.is_deepspeed_enabled)

    @property
    def generator(self) -> Any:
        """The rollout `Generator` (None until the first rollout and after `train`); owned by `self.rollouts`."""
        return self.rollouts.generator

    @generator.setter
    def generator(self, generator: Any) -> None:
        self.rollouts.generator = generator

    @property
    def _synced_step(self) -> int | None:
        return self.rollouts.synced_step

    @_synced_step.setter
    def _synced_step(self, step: int | None) -> None:
        self.rollouts.synced_step = step

    def sync_rollout_weights(self) -> int:
        """Copy the student's current weights into the rollout engine (every process takes part under ZeRO-3)."""
        return self.rollouts.sync(self.model, self.state.global_step, self._zero3)

    def rollout(self, prompts: list[Any]) -> dict[str, torch.Tensor]:
        """Sample one response per prompt from the rollout engine; return the right-padded training batch."""

        args = self.args
        params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_completion_length
        )
        seeds = rollout_seeds(args.seed, self._rollouts, self.accelerator.process_index, len(prompts))
        self._rollouts += 1
        completions = self.rollouts.sample(
            prompts, params, seeds, model=self.model, step=self.state.global_step, zero3=self._zero3
        )
        sequences = [(encode_prompt(self._tokenizer, p), r) for p, r in zip(prompts, completions)]
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["rollout/response_length"].append(sum(len(r) for r in completions) / len(completions))
        batch = right_padded_batch(sequences, self._tokenizer.pad_token_id)
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}

    # -- loss -------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = self.rollout(inputs["prompts"]) if "prompts" in inputs else inputs
        in_process = not isinstance(self.dpo_model, ServerTeacher)  # served rows are full log-probs: the logits path
        fused = in_process and self._fused_ready(model, self.dpo_model, self.rev_dpo_model)
        loss, stats, rows = batch_loss(
            model, self.dpo_model, self.rev_dpo_model, batch, self.args, self.vocab_size, self._gather_heads, fused
        )
        mode = "train" if self.model.training else "eval"
        for key, value in stats.items():
            self._metrics[mode][f"aligndistil/{key}"].append(self.accelerator.gather_for_metrics(value).mean().item())
        tokens = self.accelerator.gather_for_metrics(rows.sum()).sum().item()
        self._metrics[mode]["num_scored_tokens"].append(float(tokens))
        return (loss, {}) if return_outputs else loss

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.rollouts.close()
