"""ADPA: advantage-guided distillation from a DPO teacher and its reference (docs/methods/dckd_adpa.md §4).

    L = sft_weight · NLL(dataset chosen) + adpa_weight · L_ADPA(student responses)
    L_ADPA = −mean_t Σ_a π_θ(a | s_t) · A(s_t, a),   A = β · (ln π_dpo − ln π_ref)  (`paper`; `official`: §4.2-4.3)

The advantage term sees the **student's own responses** (the `rollout` job: greedy generations of the initial
student, made once before training as in the paper); the SFT term sees the dataset's chosen response. A batch is
laid out like TRL's preference batches, `input_ids [2B, L]`: B prompt+chosen rows, then B prompt+student-response
rows (the official code's "rejected slot"). Teacher signals come from the cache (`signals` job on the rollout with
the DPO teacher and the reference gathered at its top-k ids) or from live teachers. With `rollout_steps = N > 0`
(live teachers only) the batches of every N-th optimizer step get fresh responses from the current student through
data_gen's transformers backend. ADPA+ is this trainer started from a DCKD student with that student's rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from trl.models.utils import unwrap_model_for_generation

from align_distill.data.tokens import encode_prompt, encode_prompt_response
from align_distill.data_gen.backends import SamplingParams
from align_distill.data_gen.backends.transformers_backend import TransformersGenerator
from align_distill.losses import adpa_advantages, masked_mean

from .common import right_padded_batch
from .signals import BatchSignals, TeacherSignalReader, live_signals
from .teacher import (
    SignalsCollator,
    TeacherPairConfig,
    TeacherPairTrainer,
    check_cached_rows,
    load_teacher,
    teacher_source,
)

# the config fields of the reference's cache name, cache path (shared), server URL and served model
REFERENCE_ROLE = ("reference_name", "signals_path", "reference_server_url", "reference_server_model")


@dataclass
class ADPAConfig(TeacherPairConfig):
    r"""Configuration of [`ADPATrainer`]: `TeacherPairConfig` (TRL's `DPOConfig` + the DPO teacher, see there) plus
    the reference teacher, the student responses and the advantage term.

    Parameters:
        > Parameters that control the teachers

        reference_name (`str`, *optional*, defaults to `"ref"`):
            Name of the reference teacher's signals in the cache (`paper` mode: gathered at the DPO teacher's ids;
            `official` mode: its own top-k, for the fallback rule).
        reference_model_name_or_path (`str`, *optional*):
            The DPO teacher's reference (the SFT teacher), for `teacher_mode="model"`.
        reference_server_url (`str`, *optional*), reference_server_model (`str`, *optional*):
            The reference's vLLM server, for `teacher_mode="server"` (paper mode reads it at the DPO teacher's ids:
            its full vocabulary is asked for, so the server needs `--max-logprobs -1`).

        > Parameters that control the student responses

        response_column (`str`, *optional*, defaults to `"completion"`):
            Column of the student responses: `{response_column}_ids` holds their token ids (the `rollout` job's
            `completion_ids`), and the cache's signals are on that response.
        rollout_steps (`int`, *optional*, defaults to `0`):
            0: the responses are fixed (the paper). N > 0: the batches of every N-th optimizer step get fresh
            responses from the current student (needs `teacher_mode="model"` or `"server"`).
        temperature (`float`, *optional*, defaults to `0.0`):
            Sampling temperature of regenerated responses (0 = greedy, as the initial rollout).
        max_completion_length (`int`, *optional*, defaults to `128`):
            Length limit of regenerated responses, in tokens.

        > Parameters that control the loss

        adpa_weight (`float`, *optional*, defaults to `1.6`):
            γ, the weight of the advantage term (1.6 in the official recipe, tuned for `official` mode).
        beta (`float`, *optional*, defaults to `0.1`):
            β of the advantage A = β·(ln π_teacher − ln π_reference) (`paper` mode; not DPO's β against a reference
            model: there is none). Set it to the β the DPO teacher was trained with. `official` mode has no β.

    Changed defaults as `TeacherPairConfig`. ADPA's own collator and tokenization (prompt + chosen by TRL's rule, the
    student responses as given) make `truncation_mode`, `padding_free`, `pad_to_multiple_of` and
    `dataset_num_proc` no-ops: they are rejected when set.

    Deprecated keys (one release): `rollout_temperature` → `temperature`, `rollout_max_new_tokens` →
    `max_completion_length`, `top_k` → `signals_top_k`.
    """

    deprecated_aliases: ClassVar[dict[str, str]] = {
        "rollout_temperature": "temperature",
        "rollout_max_new_tokens": "max_completion_length",
    }
    ignored_fields: ClassVar[dict[str, str]] = {
        "truncation_mode": "ADPA's collator keeps the start of each sequence",
        "padding_free": "ADPA's collator pads the chosen and response rows itself",
        "pad_to_multiple_of": "ADPA's collator pads the chosen and response rows itself",
        "dataset_num_proc": "ADPA tokenizes its rows in one process",
        "teachers": "ADPA's advantage needs one DPO teacher and its own reference, not a mixture",
        "teacher_routing_column": "ADPA's advantage needs one DPO teacher and its own reference, not a mixture",
    }
    method_label: ClassVar[str] = "ADPA"

    beta: float = field(
        default=0.1,
        metadata={"help": "β of the advantage β·(ln π_teacher − ln π_reference) (paper mode; official has none)."},
    )

    reference_name: str = field(default="ref", metadata={"help": "Name of the reference's signals in the cache."})
    reference_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The DPO teacher's reference (SFT teacher), for teacher_mode=model."}
    )
    reference_server_url: str | None = field(
        default=None, metadata={"help": "OpenAI base URL of the reference's vLLM server (teacher_mode=server)."}
    )
    reference_server_model: str | None = field(
        default=None, metadata={"help": "Served model name of the reference (default: the server's first)."}
    )
    response_column: str = field(
        default="completion", metadata={"help": "Student responses: ids in `{response_column}_ids`."}
    )
    rollout_steps: int = field(
        default=0, metadata={"help": "0: fixed responses (paper); N: regenerate every N-th step (live teachers)."}
    )
    temperature: float = field(default=0.0, metadata={"help": "Temperature of regenerated responses (0 = greedy)."})
    max_completion_length: int = field(default=128, metadata={"help": "Length limit of regenerated responses."})
    adpa_weight: float = field(default=1.6, metadata={"help": "γ, the weight of the advantage term."})

    model_fields = ("teacher_model_name_or_path", "reference_model_name_or_path")
    server_fields = ("teacher_server_url", "reference_server_url")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rollout_steps < 0:
            raise ValueError(f"ADPAConfig: rollout_steps must be >= 0, found {self.rollout_steps}")
        if self.rollout_steps and self.teacher_mode == "cache":
            raise ValueError(
                "ADPAConfig: rollout_steps > 0 regenerates responses during training, which cached signals cannot "
                "cover; use teacher_mode=model or server"
            )


@dataclass
class DataCollatorForADPA:
    """Rows `prompt_ids + chosen_ids` (B of them), then `rollout_prompt_ids + rollout_ids` (B): `input_ids`,
    `attention_mask`, `completion_mask` (`[2B, L]`, right-padded, each sequence cut to `max_length`), and the raw
    `prompt`s when `keep_prompts` (for regenerating responses)."""

    pad_token_id: int
    max_length: int | None = None
    keep_prompts: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        chosen = [(e["prompt_ids"], e["chosen_ids"]) for e in examples]
        rollout = [(e["rollout_prompt_ids"], e["rollout_ids"]) for e in examples]
        batch = self.build(chosen + rollout)
        if self.keep_prompts:
            batch["prompt"] = [e["prompt"] for e in examples]
        return batch

    def build(self, sequences: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        return right_padded_batch(sequences, self.pad_token_id, self.max_length)


def split_rows(batch: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of every row of a collated batch."""
    rows = []
    for ids, attention, completion in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        ids, completion = ids[attention.bool()], completion[attention.bool()].bool()
        rows.append((ids[~completion].tolist(), ids[completion].tolist()))
    return rows


class ADPATrainer(TeacherPairTrainer):
    """ADPA (docs/methods/dckd_adpa.md §4) on TRL's DPOTrainer.

    `train_dataset` rows: `id`, `prompt`, `chosen` (the SFT target) and `{response_column}_ids` (the student's
    response token ids), optionally `prompt_ids` (the ids the response followed; default: the prompt through the
    chat template) — e.g. a `rollout` or `signals` store from data_gen. `teacher_model` / `reference_model` (paths or
    loaded models) override the config's paths for `teacher_mode="model"`.

    Logged: `loss/sft`, `loss/adpa` (L_ADPA before γ), `adpa/expected_advantage` (−L_ADPA),
    `adpa/advantage_mean` (mean advantage over the DPO teacher's top-k, before any clip), `adpa/token_advantage`
    (advantage of the student's own response tokens), `adpa/rollout_tokens` (mean response length).
    """

    _name = "ADPA"
    _tag_names = ["trl", "align-distill", "adpa"]
    extra_columns = ("id", "prompt", "rollout_prompt_ids", "rollout_ids")

    def __init__(
        self,
        model: Any,
        args: ADPAConfig,
        train_dataset: Any,
        processing_class: Any,
        teacher_model: Any = None,
        reference_model: Any = None,
        **kwargs: Any,
    ):
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        collator = DataCollatorForADPA(tokenizer.pad_token_id, args.max_length, keep_prompts=args.rollout_steps > 0)
        super().__init__(model, args, train_dataset, processing_class, data_collator=collator, **kwargs)
        self.teacher = self.reference = None
        self._regenerated_step = -1
        if args.teacher_mode == "model":
            trust = args.trust_remote_code
            self.teacher = self._frozen(
                load_teacher(
                    teacher_model or args.teacher_model_name_or_path, tokenizer, args.teacher_dtype, "teacher", trust
                )
            )
            self.reference = self._frozen(
                load_teacher(
                    reference_model or args.reference_model_name_or_path,
                    tokenizer,
                    args.teacher_dtype,
                    "reference",
                    trust,
                )
            )
            return
        response = args.response_column
        reader = None
        if args.teacher_mode == "cache":
            reader = TeacherSignalReader(args.signals_path, [args.teacher_name, args.reference_name], [response])
            expected_gather = args.teacher_name if args.loss_mode == "paper" else None
            if args.loss_mode == "paper" and reader.gathered[args.reference_name] != expected_gather:
                raise ValueError(
                    f"signals cache {args.signals_path}: paper-mode ADPA needs the reference {args.reference_name!r} "
                    f"gathered at the DPO teacher's ids (signals job: gather_at: {args.teacher_name}); it has its own "
                    "top-k, which would make the advantages only lower bounds"
                )
        load = self._load_frozen
        sources = {
            "dpo_": teacher_source(args, tokenizer, [response], load, reader=reader),
            "ref_": teacher_source(args, tokenizer, [response], load, REFERENCE_ROLE, reader=reader),
        }
        for source in sources.values():
            check_cached_rows(
                source, [self.train_dataset, *self._eval_datasets()], {response: "rollout_ids"},
                {response: "rollout_prompt_ids"},
            )  # fmt: skip
        # paper mode: the reference's log-probs at the DPO teacher's ids (a cache holds them gathered already)
        gather = {"ref_": "dpo_"} if args.loss_mode == "paper" and args.teacher_mode == "server" else {}
        self.teacher_sources = sources
        self.data_collator = SignalsCollator(
            self.data_collator,
            sources,
            lambda examples: [(str(e["id"]), response) for e in examples],
            lambda n: slice(n, None),
            gather=gather,
        )

    # -- data ------------------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: ADPAConfig, dataset_name: str) -> Any:
        """Tokenize prompt + chosen by TRL's rule (as DPOTrainer does) and take the student's response ids as given."""
        tokenizer = self._tokenizer
        response_ids = f"{args.response_column}_ids"
        missing = [c for c in ("id", "prompt", "chosen", response_ids) if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"ADPA {dataset_name} dataset: missing column(s) {missing}; rows need id, prompt, chosen and "
                f"{response_ids} (the rollout job's output, joined with the preference data)"
            )

        def tokenize(row: dict[str, Any]) -> dict[str, Any]:
            prompt_ids, chosen_ids = encode_prompt_response(tokenizer, row["prompt"], row["chosen"])
            rollout_prompt = row.get("prompt_ids") or encode_prompt(tokenizer, row["prompt"])
            return {
                "prompt_ids": prompt_ids,
                "chosen_ids": chosen_ids,
                "rollout_prompt_ids": list(rollout_prompt),
                "rollout_ids": list(row[response_ids]),
            }

        keep = [c for c in ("id", "prompt", "chosen", "prompt_ids", response_ids) if c in dataset.column_names]
        dataset = dataset.select_columns(keep).map(tokenize, desc=f"Tokenizing {dataset_name} dataset")
        if args.max_length is not None:
            dataset = dataset.filter(
                lambda row: max(len(row["prompt_ids"]), len(row["rollout_prompt_ids"])) < args.max_length
            )
        return dataset

    # -- student responses -----------------------------------------------------------------------------------------
    def _regenerate(self, model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch with its student-response rows replaced by fresh responses of the current student."""

        prompts = inputs["prompt"]
        params = SamplingParams(
            temperature=self.args.temperature,
            max_new_tokens=self.args.max_completion_length,
            seed=self.args.seed + self.state.global_step,
        )
        with unwrap_model_for_generation(model, self.accelerator) as unwrapped:
            was_training = unwrapped.training
            try:
                generator = TransformersGenerator(unwrapped, self._tokenizer, batch_size=len(prompts))
                completions = generator.generate(prompts, params)
            finally:
                unwrapped.train(was_training)
        half = inputs["input_ids"].shape[0] // 2
        chosen = split_rows({k: inputs[k][:half] for k in ("input_ids", "attention_mask", "completion_mask")})
        rollout = [(encode_prompt(self._tokenizer, p), c[0].token_ids) for p, c in zip(prompts, completions)]
        collator = getattr(self.data_collator, "base", self.data_collator)  # under a SignalsCollator: its base
        batch = collator.build(chosen + rollout)
        return {**inputs, **{k: v.to(inputs["input_ids"].device) for k, v in batch.items()}}

    # -- loss ------------------------------------------------------------------------------------------------------
    def _teacher_signals(self, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[BatchSignals, BatchSignals]:
        """(DPO teacher, reference) signals on the student-response rows."""
        args = self.args
        half = inputs["input_ids"].shape[0] // 2
        if self.teacher is None:
            return tuple(  # type: ignore[return-value]
                BatchSignals(inputs[f"{p}ids"], inputs[f"{p}logprobs"], inputs[f"{p}token_logprobs"])
                for p in ("dpo_", "ref_")
            )
        rows = {k: inputs[k][half:] for k in ("input_ids", "attention_mask", "completion_mask")}
        dpo = live_signals(self._teacher_logits(self.teacher, rows), labels, args.signals_top_k)
        gather = dpo.ids if args.loss_mode == "paper" else None
        ref = live_signals(self._teacher_logits(self.reference, rows), labels, args.signals_top_k, gather_ids=gather)
        return dpo, ref

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        if args.rollout_steps and self.model.training and self.state.global_step % args.rollout_steps == 0:
            inputs = self._regenerate(model, inputs)
            if self.teacher is None:  # served teachers: their signals on the fresh responses
                half = inputs["input_ids"].shape[0] // 2
                keys = [("", args.response_column)] * (inputs["input_ids"].shape[0] - half)
                inputs = self.data_collator.add_signals(dict(inputs), keys, slice(half, None))
        # live teachers give top-k signals (from their logits, no graph): only the student's head is fused
        scores, outputs = self._scores(model, inputs, need_logits=return_outputs)
        labels, mask = scores.labels, scores.mask
        half = inputs["input_ids"].shape[0] // 2
        roll = slice(half, None)
        dpo, ref = self._teacher_signals(inputs, labels[roll])
        beta = args.beta if args.loss_mode == "paper" else 1.0
        adv_ids, advantages = adpa_advantages(dpo.ids, dpo.logprobs, ref.ids, ref.logprobs, beta, args.loss_mode)
        parts = {
            "loss/sft": scores.nll(slice(None, half)),
            "loss/adpa": scores.adpa(roll, adv_ids, advantages, args.loss_mode),
        }
        loss = args.sft_weight * parts["loss/sft"] + args.adpa_weight * parts["loss/adpa"]
        with torch.no_grad():
            parts["adpa/expected_advantage"] = -parts["loss/adpa"]
            parts["adpa/advantage_mean"] = masked_mean(advantages.mean(-1), mask[roll])
            token_advantage = beta * (dpo.token_logprobs - ref.token_logprobs)
            parts["adpa/token_advantage"] = masked_mean(token_advantage, mask[roll])
            parts["adpa/rollout_tokens"] = mask[roll].sum(-1).float().mean()
        self._record(parts)
        return (loss, outputs) if return_outputs else loss
