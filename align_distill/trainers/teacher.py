"""What the teacher-signal methods (DCKD, ADPA) share: the config of the teacher side (`TeacherPairConfig`), the
collator that adds cached teacher signals to TRL's preference batch, loading a frozen teacher, and
`TeacherPairTrainer` (TRL's `DPOTrainer` without a DPO reference: the teachers replace it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
from trl import DPOConfig, DPOTrainer

from align_distill.models import check_tokenizer_compatibility, load_model, load_tokenizer, slice_logits_to_vocab
from align_distill.models.vocab import check_model_vocab
from align_distill.teachers.server import ServerTeacher
from align_distill.teachers.signals import TeacherSignalReader
from align_distill.teachers.sources import (
    CacheTeacher,
    RoutedTeacher,
    SignalsRequest,
    build_sources,
    canonical_teacher_mode,
    combine,
    readers_of,
    teacher_specs,
)
from align_distill.vocabulary import reject_ignored_fields

from .common import (
    DPO_LOSS_OPTIONS,
    DPO_REFERENCE_SYNC,
    default_precision,
    frozen_logits,
    prepare_frozen,
    record_metrics,
    response_view,
)
from .fused_heads import FusedLMHeadConfig, FusedLMHeadMixin, HiddenHead, ResponseScores


@dataclass
class TeacherSourceConfig(FusedLMHeadConfig):
    """The teacher-source fields every top-k teacher trainer shares (DCKD, ADPA, KD): the server, k, and several
    teachers (`TeacherPairConfig` and `KDConfig` document them). A mixin: `XConfig(TRLConfig, TeacherSourceConfig)`.
    """

    teacher_server_url: str | None = field(
        default=None, metadata={"help": "OpenAI base URL of the teacher's vLLM server (teacher_mode=server)."}
    )
    teacher_server_model: str | None = field(default=None, metadata={"help": "Served model name (default: first)."})
    teacher_server_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Teacher server client settings (api_key_env, max_concurrency, timeout, ...)."}
    )
    signals_top_k: int = field(default=50, metadata={"help": "Model/server teachers: ids per position (top-k)."})
    teachers: list[dict[str, Any]] | str | None = field(
        default=None, metadata={"help": "Several teachers: [{name, kind, weight, model_name_or_path|signals_path|…}]."}
    )
    teacher_routing_column: str | None = field(
        default=None, metadata={"help": "With teachers: the column naming each row's teacher."}
    )

@dataclass
class TeacherPairConfig(DPOConfig, TeacherSourceConfig):
    r"""What DCKD and ADPA configs share: TRL's `DPOConfig` (data, optimisation, logging, saving) plus the teacher and
    the loss mode. DPO fields the distillation loss never reads (`loss_type`, the reference-model options, ...:
    `ignored_fields`) are rejected when set.

    Parameters:
        > Parameters that control the teacher

        teacher_mode (`str`, *optional*, defaults to `"cache"`):
            Where the teacher runs (docs/teachers.md). `cache`: read the teachers' top-k signals from
            `signals_path` (no teacher in memory). `model`: load the teacher model(s) and run them on every batch
            (no grad). `server`: ask a running vLLM server (`teacher_server_url`) for the top-k log-probs of every
            batch. `live` is the deprecated name of `model` (one release).
        signals_path (`str`, *optional*):
            Teacher-signal cache (`align-distill generate signals`) computed on exactly the responses trained on.
        teacher_name (`str`, *optional*, defaults to `"dpo"`):
            Name of the aligned (DPO) teacher's signals in the cache.
        teacher_model_name_or_path (`str`, *optional*):
            The aligned (DPO) teacher, for `teacher_mode="model"`. Must share the student's tokenizer.
        teacher_dtype (`str`, *optional*, defaults to `"auto"`):
            dtype in-process teachers are loaded in.
        teacher_server_url (`str`, *optional*):
            OpenAI base URL of the vLLM server of the aligned teacher (`teacher_mode="server"`), e.g.
            `http://host:8000/v1`. Its tokenizer must be the student's (checked before training).
        teacher_server_model (`str`, *optional*):
            Served model name; default: the server's first model.
        teacher_server_kwargs (`dict`, *optional*):
            Client settings of every teacher server: `api_key_env` (default `OPENAI_API_KEY`), `max_concurrency`
            (rows in flight, 8), `timeout` (s per attempt, 60), `max_retries` (5), `backoff_base`, `backoff_max`.
        signals_top_k (`int`, *optional*, defaults to `50`):
            In-process and served teachers: ids kept per position where the loss is top-k (cache mode uses the
            cache's k).
        teachers (`list[dict]`, *optional*):
            Several teachers instead of one (docs/teachers.md, "Several teachers"): each `{name, kind, weight,
            model_name_or_path | signals_path | server_url, server_model}`. Their top-k distributions are mixed
            by weight (renormalised over the union of their ids), or each row uses the teacher its
            `teacher_routing_column` names. The loss is the top-k form.
        teacher_routing_column (`str`, *optional*):
            With `teachers`: the dataset column whose value names each row's teacher.

        > Parameters that control the loss

        loss_mode (`str`, *optional*, defaults to `"paper"`):
            `paper`: the paper's formulas without clamps. `official`: the official code's clamps
            (dckd_adpa §3.2, §4.3).
        sft_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the NLL on the dataset's chosen response.
        loss_reduction (`str`, *optional*, defaults to `"token_mean"`):
            `token_mean` (pooled over the micro-batch, as the official code) or `sequence_mean`.
        loss_chunk_size (`int`, *optional*):
            Positions per chunk of the vocabulary-wide loss work (logits path; bounds peak memory); `None` picks
            ~16 MiB chunks.
        fused_lm_head (`bool`, *optional*, defaults to `True`):
            The loss from hidden states and LM heads in vocabulary tiles, no `[B, T, V]` logits; `False`: the
            logits path (`FusedLMHeadConfig`).

    Changed defaults: `bf16=None` means bf16 only on a CUDA device that supports it; `learning_rate` 5e-7 (the
    official DCKD/ADPA recipes).

    Deprecated key (one release): `top_k` → `signals_top_k`.
    """

    deprecated_aliases: ClassVar[dict[str, str]] = {"top_k": "signals_top_k"}
    ignored_fields: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("loss_type", *DPO_LOSS_OPTIONS), "the DPO loss is replaced by the distillation loss"),
        "label_smoothing_factor": "the distillation loss replaces the Trainer's",
        "router_aux_loss_coef": "the distillation loss has no MoE load-balancing term",
        **dict.fromkeys(
            ("precompute_ref_log_probs", "precompute_ref_batch_size", *DPO_REFERENCE_SYNC),
            "there is no DPO reference model; the teachers replace it",
        ),
    }
    method_label: ClassVar[str] = "DCKD/ADPA"

    teacher_mode: Literal["cache", "model", "server", "live"] = field(
        default="cache",
        metadata={"help": "cache: signals_path; model: run the teacher(s) here; server: a vLLM server (live: model)."},
    )
    signals_path: str | None = field(
        default=None, metadata={"help": "Teacher-signal cache computed on the responses trained on (cache mode)."}
    )
    teacher_name: str = field(default="dpo", metadata={"help": "Name of the aligned teacher's signals in the cache."})
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The aligned (DPO) teacher model (teacher_mode=model)."}
    )
    teacher_dtype: str = field(default="auto", metadata={"help": "dtype of in-process teachers."})
    loss_mode: Literal["paper", "official"] = field(
        default="paper", metadata={"help": "paper: the paper's formulas, no clamps; official: the official clamps."}
    )
    sft_weight: float = field(default=1.0, metadata={"help": "Weight of the NLL on the chosen response."})
    loss_reduction: Literal["token_mean", "sequence_mean"] = field(
        default="token_mean", metadata={"help": "token_mean (pooled over the micro-batch) or sequence_mean."}
    )
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Positions per chunk of the vocabulary-wide loss work (None: automatic)."}
    )
    learning_rate: float = field(default=5e-7, metadata={"help": "Initial AdamW learning rate."})

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + ["teacher_server_kwargs"]
    model_fields = ("teacher_model_name_or_path",)
    server_fields = ("teacher_server_url",)

    def __post_init__(self) -> None:
        default_precision(self)
        reject_ignored_fields(self)  # the values as given, before TRL resolves them
        super().__post_init__()
        check_teacher_mode(self, model_fields=self.model_fields, server_fields=self.server_fields)


def check_teacher_mode(config: Any, model_fields: tuple[str, ...], server_fields: tuple[str, ...] = ()) -> None:
    """`cache` needs `signals_path`, `model` the teacher model fields, `server` the server URLs; `teachers` (several)
    are checked one by one. `teacher_mode: live` becomes `model` (deprecated)."""
    name = type(config).__name__
    canonical_teacher_mode(config)
    if isinstance(config.teacher_server_kwargs, str):
        config.teacher_server_kwargs = json.loads(config.teacher_server_kwargs)
    if getattr(config, "loss_mode", "paper") not in ("paper", "official"):
        raise ValueError(f"{name}: loss_mode must be paper or official, found {config.loss_mode!r}")
    if getattr(config, "teachers", None):
        if isinstance(config.teachers, str):
            config.teachers = json.loads(config.teachers)
        teacher_specs(config.teachers, f"{name}.teachers")
    elif config.teacher_routing_column:
        raise ValueError(f"{name}: teacher_routing_column routes rows between `teachers`; set `teachers` too")
    elif config.teacher_mode == "cache" and not config.signals_path:
        raise ValueError(f"{name}: teacher_mode=cache needs signals_path (the output of `generate signals`)")
    elif config.teacher_mode in ("model", "server"):
        needed = model_fields if config.teacher_mode == "model" else server_fields
        missing = [f for f in needed if not getattr(config, f)]
        if missing:
            raise ValueError(f"{name}: teacher_mode={config.teacher_mode} needs {', '.join(missing)}")
    if config.signals_top_k < 1:
        raise ValueError(f"{name}: signals_top_k must be >= 1, found {config.signals_top_k}")


@dataclass
class SignalsCollator:
    """TRL's preference collator plus teacher signals: `{prefix}ids` / `{prefix}logprobs` / `{prefix}token_logprobs`
    (`[N, L-1, K]`, `[N, L-1]`) from each teacher source (`sources`, by prefix) for the batch rows that `layout`
    names; `gather[prefix]` = another prefix whose ids this source is read at (ADPA's reference); with
    `routing_column`, each row carries the teacher its column names."""

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]
    sources: dict[str, Any]
    layout: Callable[[list[dict[str, Any]]], list[tuple[str, str]]]
    rows: Callable[[int], slice]
    gather: dict[str, str] = field(default_factory=dict)
    routing_column: str | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        keys = self.layout(examples)
        routes = None
        if self.routing_column:
            route_of = {str(e["id"]): e[self.routing_column] for e in examples}
            routes = [route_of[row_id] for row_id, _ in keys]
            batch["teacher_routes"] = routes  # kept for signals on resampled rows (KD's on-policy batches)
        return self.add_signals(batch, keys, self.rows(len(examples)), routes)

    def add_signals(
        self, batch: dict[str, Any], keys: list[tuple[str, str]], rows: slice, routes: list[str] | None = None
    ) -> dict[str, Any]:
        """`batch` with the signals of its `rows` (named by `keys`) from every source, in place."""
        request = SignalsRequest(
            keys,
            batch["input_ids"][rows],
            batch["completion_mask"][rows],
            batch["attention_mask"][rows] if "attention_mask" in batch else None,
            routes=routes,
        )
        for prefix, source in self.sources.items():
            at = self.gather.get(prefix)
            signals = source.signals(replace(request, gather_ids=batch[f"{at}ids"]) if at else request)
            device = batch["input_ids"].device
            batch[f"{prefix}ids"] = signals.ids.to(device)
            batch[f"{prefix}logprobs"] = signals.logprobs.to(device)
            batch[f"{prefix}token_logprobs"] = signals.token_logprobs.to(device)
        return batch


def teacher_source(
    args: Any,
    tokenizer: Any,
    responses: list[str],
    load: Callable[[str, str], Any],
    role: tuple[str, str, str, str] = ("teacher_name", "signals_path", "teacher_server_url", "teacher_server_model"),
    reader: TeacherSignalReader | None = None,
) -> Any:
    """The top-k teacher source a config asks for (`cache`, `server`, or `teachers`), for one teacher `role`: the
    config fields of its cache name, cache path, server URL and served model. `reader` shares an open cache."""
    name_field, path_field, url_field, model_field = role
    if getattr(args, "teachers", None):
        specs = teacher_specs(args.teachers, f"{type(args).__name__}.teachers")
        sources = build_sources(
            specs,
            tokenizer=tokenizer,
            top_k=args.signals_top_k,
            responses=responses,
            load_model=load,
            server_kwargs=args.teacher_server_kwargs,
        )
        return combine(sources, specs, args.teacher_routing_column)
    name = getattr(args, name_field)
    if args.teacher_mode == "server":
        return ServerTeacher(
            getattr(args, url_field),
            tokenizer,
            args.signals_top_k,
            name=name,
            model=getattr(args, model_field),
            client_kwargs=args.teacher_server_kwargs,
        )
    return CacheTeacher(reader or TeacherSignalReader(getattr(args, path_field), [name], responses), name)


def check_cached_rows(source: Any, datasets: list[Any], columns: dict[str, str], prompts: dict | None = None) -> None:
    """Every dataset row is in each cache the source reads, with the same ids; rows name known teachers."""
    for dataset in datasets:
        for reader in readers_of(source):
            reader.check_dataset(dataset, columns, prompts)
        if isinstance(source, RoutedTeacher):
            source.check_routes(dataset)


def load_teacher(model: Any, tokenizer: Any, dtype: str, name: str, trust_remote_code: bool = False) -> Any:
    """A frozen teacher from a path (its tokenizer must match the student's) or an already loaded model."""
    if isinstance(model, str):
        check_tokenizer_compatibility(
            load_tokenizer(model, trust_remote_code=trust_remote_code), tokenizer, names=(name, "student")
        )
        model = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, frozen=True)
    check_model_vocab(model, tokenizer, name=name)
    return model


class TeacherPairTrainer(FusedLMHeadMixin, DPOTrainer):
    """What DCKD and ADPA share on top of TRL's `DPOTrainer`: no DPO reference model (the teachers replace it), the
    row `id` kept for the signal cache, in-process teachers frozen and placed like TRL's reference model, student
    logits aligned to the responses over the shared vocabulary, and `_record` for TRL-style metrics."""

    _tag_names = ["trl", "align-distill"]
    # extra dataset columns the collator needs (TRL drops columns the model's forward does not take)
    extra_columns: tuple[str, ...] = ("id",)

    def __init__(self, model: Any, args: Any, train_dataset: Any, processing_class: Any, **kwargs: Any):
        # DPOTrainer builds a reference model unless reference log-probs are precomputed; distillation has no DPO
        # reference term, so take that path and make the precomputation a no-op (`_precompute_ref_logps`).
        requested = args.precompute_ref_log_probs
        args.precompute_ref_log_probs = True
        try:
            super().__init__(
                model=model, args=args, train_dataset=train_dataset, processing_class=processing_class, **kwargs
            )
        finally:
            args.precompute_ref_log_probs = requested
        self.precompute_ref_logps = False
        self.vocab_size = len(self._tokenizer)

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *self.extra_columns]))

    def _frozen(self, model: Any) -> Any:
        return prepare_frozen(model, self.accelerator, self.is_deepspeed_enabled)

    def _load_frozen(self, path: str, name: str) -> Any:
        """A teacher of `teachers:` loaded by path, checked against the student's tokenizer and placed frozen."""
        return self._frozen(
            load_teacher(path, self._tokenizer, self.args.teacher_dtype, name, self.args.trust_remote_code)
        )

    def _eval_datasets(self) -> list[Any]:
        if self.eval_dataset is None:
            return []
        return list(self.eval_dataset.values()) if isinstance(self.eval_dataset, dict) else [self.eval_dataset]

    def _aligned(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """`(logits [N, L-1, V], labels, mask)` over the tokenizer's vocabulary (a padded head is cut)."""
        return response_view(
            slice_logits_to_vocab(logits, self.vocab_size), inputs["input_ids"], inputs["completion_mask"]
        )

    def _teacher_logits(self, teacher: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = frozen_logits(teacher, inputs["input_ids"], inputs["attention_mask"])
        return self._aligned(logits, inputs)[0]

    def _student_outputs(self, model: Any, inputs: dict[str, torch.Tensor]) -> Any:
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)

    def _scores(
        self, model: Any, inputs: dict[str, torch.Tensor], teachers: tuple[Any, ...] = (), need_logits: bool = False
    ) -> tuple[ResponseScores, Any]:
        """The student's loss terms over the response view, and its outputs (None on the fused path): fused
        (`fused_lm_head`, plain heads on the student and the live `teachers`) unless `need_logits`."""
        labels, mask = inputs["input_ids"][:, 1:], inputs["completion_mask"][:, 1:].bool()
        view = {"labels": labels, "mask": mask, "reduction": self.args.loss_reduction}
        if not need_logits and self._fused_ready(model, *teachers):
            forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            student = self._fused_hidden(model, forward, self.vocab_size)
            return ResponseScores(**view, student=student), None
        outputs = self._student_outputs(model, inputs)
        logits = self._aligned(outputs.logits, inputs)[0]
        return ResponseScores(**view, chunk_size=self.args.loss_chunk_size, logits=logits), outputs

    def _live_teacher(self, teacher: Any, inputs: dict[str, torch.Tensor], fused: bool) -> torch.Tensor | HiddenHead:
        """A live teacher on the batch: hidden states + head (fused path) or aligned logits, no graph kept."""
        if not fused:
            return self._teacher_logits(teacher, inputs)
        with torch.no_grad():
            forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            return self._fused_hidden(teacher, forward, self.vocab_size)

    def _record(self, values: dict[str, torch.Tensor]) -> None:
        record_metrics(self, values)
