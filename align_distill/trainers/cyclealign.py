"""CycleAlign (specs/cyclealign.md): a white-box model learns from a black-box ranker over cycles.

One cycle (§2), each step writing into `output_dir/cycle_<k>/`:

    prompts.jsonl       this cycle's chunk of the training prompts
    samples/            data_gen `rollout` store: N·oversample samples per prompt from the current white box
    candidates.jsonl    the first N distinct samples per prompt (prompts with fewer than 2 are dropped, counted)
    demonstrations.json the demonstration pool the black box is shown in this cycle (static + dynamic, §3, §6)
    black_box/          data_gen `rank` store: the black box's ranking ρ_B (null + reason where it failed, §2.2)
    white_box/          data_gen `rank` store: ranking ρ_W by length-normalised log-likelihood (§4)
    rankings.jsonl      per prompt: ρ_B, ρ_W, the agreement α = LCS (§5), Kendall τ, the training target
    pool.json           the demonstration pool after adding this cycle's agreement rankings (§6)
    checkpoints/        HF Trainer checkpoints of this cycle's PRO training (§7)
    model/              the white box after the cycle; `metrics.json` marks the cycle done

A rerun with the same `output_dir` skips finished cycles, resumes the stores where they stopped (exactly once)
and training from the cycle's last checkpoint.

Several processes (`torchrun`, `accelerate launch`, `deepspeed`) all run the loop: sampling and both rankings are
split into one store part per process, the main process writes the files, and PRO training is the Trainer's (DDP,
ZeRO-2, ZeRO-3). A LoRA white box (`peft_config`) samples and ranks with its adapter applied, and each cycle's
`model/` holds the adapter.

`CycleAlignTrainer` is the training step alone: PRO's list-wise loss plus SFT on the top response
(`align_distill.losses.pro_loss`) on prompt / completions / ranking rows.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from align_distill.losses import pro_loss
from align_distill.losses.reduction import token_logps
from align_distill.trainers.common import response_view

logger = logging.getLogger(__name__)

TARGETS = ("black_box", "agreement")
DATASET_RESPONSES = ("chosen", "rejected")


@dataclass
class CycleAlignConfig(TrainingArguments):
    r"""Configuration of [`CycleAlignTrainer`] and of the CycleAlign loop (specs/cyclealign.md).

    Parameters:
        > Parameters that control the cycles

        cycles (`int`, defaults to `3`):
            Number of cycles C; each takes the next chunk of the prompts.
        prompts_per_cycle (`int`, *optional*):
            Prompts per cycle; default: all prompts split into C chunks. Larger than that wraps around the data.
        num_responses (`int`, defaults to `4`):
            Responses N sampled from the white box per prompt and ranked (2 ≤ N ≤ 6 keeps the judge prompt short).
        oversample (`int`, defaults to `2`):
            Draw N·oversample samples and keep the first N distinct; a prompt with fewer than 2 distinct is dropped.
        temperature (`float`, defaults to `1.0`), top_p (`float`, defaults to `0.9`):
            White-box sampling settings (§2.1).
        max_new_tokens (`int`, defaults to `128`):
            Longest sampled response.
        generation_batch_size (`int`, defaults to `32`):
            Sequences per generation / likelihood-scoring batch of the white box.

        dataset_responses (`bool`, defaults to `False`):
            Also put each prompt's `chosen` / `rejected` responses from the data (a preference dataset) among the
            candidates, after the N samples (spec §9.7, an open question; the paper ranks model samples only).

        > Parameters that control the black box and the demonstrations

        black_box (`dict`):
            The judge: `kind: llm` with data_gen judge keys (`model`, `backend` transformers | vllm | openai,
            `backend_kwargs` e.g. `{base_url: http://host:8000/v1}`, `instruction`, `max_retries` (default 1),
            `temperature`, `max_new_tokens`); or `kind: noisy_oracle` (`function: module:function`, `noise`,
            `failure_rate`, `seed`); or `callable` / `reward_model`. A JSON string on the command line.
        static_demonstrations (`str`, *optional*):
            Hand-written demonstrations (.json/.jsonl of prompt, completions, 0-based ranking); default: the
            built-in two; `none`: no static demonstrations.
        dynamic_demonstrations (`int`, defaults to `2`):
            k_d agreement demonstrations added to each black-box query.
        demonstration_selection (`str`, defaults to `"recent"`):
            `recent` (the k_d newest) or `similar` (highest bag-of-words cosine with the query's prompt).
        demonstration_pool_size (`int`, defaults to `500`):
            Capacity of the dynamic pool (FIFO, one entry per prompt).
        min_agreement (`int`, defaults to `3`):
            m_min: an agreement ranking enters the pool if it orders at least this many responses.
        shuffle_candidates (`bool`, defaults to `False`):
            Show the black box each prompt's candidates in a seeded random order (against position bias).
        max_judge_prompt_chars (`int`, *optional*):
            Cap on an LLM judge's prompt in characters: dynamic demonstrations are left out until it fits.

        > Parameters that control the training

        training_target (`str`, defaults to `"black_box"`):
            Rank to learn: `black_box` (ρ_B, all N responses) or `agreement` (α; prompts with |α| < 2 are skipped).
        sft_beta (`float`, defaults to `0.05`):
            β_sft: the SFT term on the top response is weighted β_sft·(n − 1)² (PRO's code).
        length_normalise (`bool`, defaults to `True`):
            Scores (white-box ranking and training) are mean token log-probs; `False`: sums.
        max_length (`int`, defaults to `512`):
            Longest prompt + response in tokens when training (the response is cut).
        reward_function (`str`, *optional*):
            `module:function` of a ground-truth reward, only for logging the mean reward of each cycle's samples
            and of the black box's top choices (the quickstart uses `align_distill.synthetic:reward`).
        trust_remote_code (`bool`, defaults to `False`):
            Allow models and tokenizers that ship their own Python code.

    `num_train_epochs` / `max_steps` apply to each cycle. Changed defaults from `TrainingArguments`:
    `learning_rate=5e-6` (PRO), `logging_steps=10`, `remove_unused_columns=False` (the collator needs the ranked
    candidates), `bf16=None` (bf16 only on a CUDA device that supports it).
    """

    cycles: int = field(default=3, metadata={"help": "Number of cycles C."})
    prompts_per_cycle: int | None = field(
        default=None, metadata={"help": "Prompts per cycle (default: the prompts split into C chunks)."}
    )
    num_responses: int = field(default=4, metadata={"help": "Responses N sampled and ranked per prompt."})
    oversample: int = field(
        default=2, metadata={"help": "Draw N·oversample samples, keep the first N distinct responses."}
    )
    temperature: float = field(default=1.0, metadata={"help": "White-box sampling temperature."})
    top_p: float = field(default=0.9, metadata={"help": "White-box nucleus sampling threshold."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest sampled response in tokens."})
    generation_batch_size: int = field(
        default=32, metadata={"help": "Sequences per white-box generation / scoring batch."}
    )
    black_box: dict | str | None = field(
        default=None,
        metadata={
            "help": "The black-box judge as a mapping (YAML) or JSON string: kind llm | noisy_oracle | callable | "
            "reward_model, plus that judge's keys."
        },
    )
    static_demonstrations: str | None = field(
        default=None,
        metadata={"help": "Static demonstrations file (.json/.jsonl); default built-in; 'none' for none."},
    )
    dynamic_demonstrations: int = field(default=2, metadata={"help": "k_d agreement demonstrations per query."})
    demonstration_selection: str = field(
        default="recent", metadata={"help": "recent | similar.", "choices": ["recent", "similar"]}
    )
    demonstration_pool_size: int = field(default=500, metadata={"help": "Capacity of the dynamic pool."})
    min_agreement: int = field(default=3, metadata={"help": "m_min: shortest agreement ranking kept as a demo."})
    shuffle_candidates: bool = field(
        default=False, metadata={"help": "Show candidates to the black box in a seeded random order."}
    )
    max_judge_prompt_chars: int | None = field(
        default=None, metadata={"help": "Cap on the LLM judge's prompt (characters); drops dynamic demos to fit."}
    )
    training_target: str = field(
        default="black_box", metadata={"help": "Ranking to train on: black_box | agreement.", "choices": list(TARGETS)}
    )
    sft_beta: float = field(default=0.05, metadata={"help": "β_sft; SFT weight β_sft·(n−1)²."})
    length_normalise: bool = field(default=True, metadata={"help": "Mean (not summed) token log-probs as scores."})
    max_length: int | None = field(default=512, metadata={"help": "Longest prompt + response when training."})
    reward_function: str | None = field(
        default=None, metadata={"help": "module:function ground-truth reward, for logging only."}
    )
    dataset_responses: bool = field(
        default=False,
        metadata={"help": "Also rank the data's own chosen/rejected responses next to the samples (spec §9.7)."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models and tokenizers that ship their own Python code."}
    )

    # changed defaults
    learning_rate: float = field(default=5e-6, metadata={"help": "AdamW learning rate (PRO: 5e-6)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the ranked-candidate columns for the collator."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: only on a CUDA device that supports it."}
    )

    def __post_init__(self) -> None:
        from align_distill.methods.common import default_precision

        default_precision(self)
        if isinstance(self.black_box, str):
            try:
                self.black_box = json.loads(self.black_box)
            except json.JSONDecodeError as error:
                raise ValueError(f"black_box must be a mapping or a JSON object string: {error}") from None
        problems = []
        if self.cycles < 1:
            problems.append(f"cycles must be >= 1, got {self.cycles}")
        if self.num_responses < 2:
            problems.append(f"num_responses must be >= 2 (a ranking needs two responses), got {self.num_responses}")
        if self.oversample < 1:
            problems.append(f"oversample must be >= 1, got {self.oversample}")
        if self.prompts_per_cycle is not None and self.prompts_per_cycle < 1:
            problems.append(f"prompts_per_cycle must be >= 1, got {self.prompts_per_cycle}")
        if self.training_target not in TARGETS:
            problems.append(f"training_target must be one of {TARGETS}, got {self.training_target!r}")
        if self.min_agreement < 2:
            problems.append(f"min_agreement must be >= 2, got {self.min_agreement}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0 (N distinct samples need sampling), got {self.temperature}")
        if problems:
            raise ValueError("CycleAlignConfig: " + "; ".join(problems))
        super().__post_init__()


# -- the training step ------------------------------------------------------------------------------------------


def tokenize_ranked(row: dict[str, Any], tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    """A ranking row (`prompt`, `completions`, `ranking` best first, possibly shorter than completions) → the
    ranked candidates' `prompt_ids` and `completion_ids`, best first. Responses are tokenized with their prompt by
    TRL's rule (data_gen.tokens), the same ids the white-box judge scored; a response is cut to fit `max_length`."""
    from align_distill.data_gen.tokens import encode_prompt_response

    prompt_ids, completion_ids = [], []
    for index in row["ranking"]:
        prompt, response = encode_prompt_response(tokenizer, row["prompt"], row["completions"][index])
        if max_length is not None and len(prompt) + len(response) > max_length:
            if len(prompt) >= max_length:
                raise ValueError(
                    f"row {row.get('id', '?')}: the prompt alone has {len(prompt)} tokens, max_length is {max_length}"
                )
            response = response[: max_length - len(prompt)]
        prompt_ids.append(prompt)
        completion_ids.append(response)
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids}


@dataclass
class RankedCandidatesCollator:
    """B prompts with n_b ranked candidates each → one right-padded batch of Σ n_b sequences.

    Returns `input_ids`, `attention_mask`, `completion_mask` `[S, L]`, and `slot_row [S]`, `slot_rank [S]`
    (which prompt, which rank each sequence is), `num_ranked [B]`.
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, masks, rows, ranks = [], [], [], []
        for b, feature in enumerate(features):
            for k, (prompt, response) in enumerate(zip(feature["prompt_ids"], feature["completion_ids"])):
                sequences.append(list(prompt) + list(response))
                masks.append([0] * len(prompt) + [1] * len(response))
                rows.append(b)
                ranks.append(k)
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), length), dtype=torch.long)
        completion = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, (sequence, mask) in enumerate(zip(sequences, masks)):
            input_ids[i, : len(sequence)] = torch.tensor(sequence)
            attention[i, : len(sequence)] = 1
            completion[i, : len(mask)] = torch.tensor(mask)
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "completion_mask": completion,
            "slot_row": torch.tensor(rows),
            "slot_rank": torch.tensor(ranks),
            "num_ranked": torch.tensor([len(f["completion_ids"]) for f in features]),
        }


class CycleAlignTrainer(Trainer):
    """PRO training on ranked responses (spec §7): `train_dataset` rows hold `prompt`, `completions` and `ranking`
    (0-based, best first; the ranked ones are trained on). Logs `rank_loss`, `sft_nll` and `top1_accuracy` (the
    policy's own score puts the target's best response first)."""

    def __init__(
        self,
        model: PreTrainedModel,
        args: CycleAlignConfig,
        train_dataset: datasets.Dataset,
        processing_class: Any,
        eval_dataset: datasets.Dataset | None = None,
        callbacks: list | None = None,
    ):
        tokenizer = processing_class
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train_dataset = self.tokenize(train_dataset, tokenizer, args.max_length)
        eval_dataset = self.tokenize(eval_dataset, tokenizer, args.max_length) if eval_dataset is not None else None
        super().__init__(
            model=model,
            args=args,
            data_collator=RankedCandidatesCollator(pad),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        self.model_accepts_loss_kwargs = False  # a mean over prompts: Trainer scales it for accumulation
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    @staticmethod
    def tokenize(dataset: datasets.Dataset, tokenizer: Any, max_length: int | None) -> datasets.Dataset:
        if "prompt_ids" in dataset.column_names:
            return dataset
        missing = [c for c in ("prompt", "completions", "ranking") if c not in dataset.column_names]
        if missing:
            raise ValueError(f"CycleAlignTrainer needs prompt, completions and ranking columns; missing {missing}")
        short = [i for i, r in enumerate(dataset["ranking"]) if len(r) < 2]
        if short:
            raise ValueError(f"rows {short[:10]} rank fewer than 2 responses; drop them (no ranking signal)")
        return dataset.map(lambda row: tokenize_ranked(row, tokenizer, max_length), desc="tokenize rankings")

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None
    ):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        logits, labels, mask = response_view(logits, inputs["input_ids"], inputs["completion_mask"])
        per_sequence = (token_logps(logits, labels) * mask).sum(dim=-1)  # [S] summed response log-probs
        lengths = mask.sum(dim=-1)
        # sequences → [B, N] tables in rank order (slot k = the k-th best); empty slots are masked by `valid`
        batch, slots = inputs["num_ranked"].shape[0], int(inputs["num_ranked"].max())
        where = (inputs["slot_row"], inputs["slot_rank"])
        seq_logps = per_sequence.new_zeros(batch, slots).index_put(where, per_sequence)
        seq_lengths = lengths.new_ones(batch, slots).index_put(where, lengths)
        ranking = torch.arange(slots, device=seq_logps.device).expand(batch, slots)
        valid = ranking < inputs["num_ranked"][:, None]
        loss, rank_losses, sft_nlls = pro_loss(
            seq_logps,
            seq_lengths,
            ranking,
            valid,
            sft_beta=self.args.sft_beta,
            length_normalise=self.args.length_normalise,
        )
        with torch.no_grad():
            scores = seq_logps / seq_lengths.clamp(min=1) if self.args.length_normalise else seq_logps
            best = scores.masked_fill(~valid, float("-inf")).argmax(dim=1)
            mode = "train" if model.training else "eval"
            local = torch.stack([rank_losses.mean(), sft_nlls.mean(), (best == 0).float().mean()]).float()
            # every process's batch mean (equal batch sizes: their mean is the global batch's), not only this one's
            values = self.accelerator.gather(local[None]).mean(dim=0).tolist()
            for key, value in zip(("rank_loss", "sft_nll", "top1_accuracy"), values):
                self._metrics[mode][key].append(value)
        return (loss, {"scores": scores}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        averaged = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            averaged = {f"eval_{k}": v for k, v in averaged.items()}
        super().log({**logs, **averaged}, start_time)
        self._metrics[mode].clear()


# -- the loop ---------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def _distinct(texts: list[Any], n: int) -> list[Any]:
    seen, kept = set(), []
    for text in texts:
        key = json.dumps(text, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(text)
    return kept[:n]


def _number(value: Any) -> float:
    return float(getattr(value, "total", value))


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


# -- several processes ------------------------------------------------------------------------------------------


def _process() -> tuple[int, int]:
    """(rank, world size) of the launched process group; (0, 1) in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    """Wait for every process: a file the main process wrote (or a store part another wrote) is then complete."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _zero3() -> bool:
    """DeepSpeed ZeRO-3 is active (the training arguments name a stage-3 config): models load partitioned."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def _whole_models():
    """Build models whole even under ZeRO-3 (the black-box judge, the white box's sampling copy): a partitioned
    model cannot run outside a DeepSpeed engine. aligndistil's rollout copy needs the same."""
    from align_distill.trainers.common import without_zero3_init

    return without_zero3_init() if _zero3() else contextlib.nullcontext()


def _is_peft(model: Any) -> bool:
    from accelerate.utils import is_peft_model

    return is_peft_model(model)


def cycle_prompts(prompts: datasets.Dataset, cycle: int, cycles: int, per_cycle: int | None) -> list[dict]:
    """Cycle k's chunk (1-based): contiguous slices of `per_cycle` rows (default len / C), wrapping around."""
    total = len(prompts)
    per_cycle = per_cycle or max(1, total // cycles)
    start = (cycle - 1) * per_cycle
    indices = [(start + i) % total for i in range(min(per_cycle, total))]
    return [{"id": prompts[i]["id"], "prompt": prompts[i]["prompt"]} for i in indices]


def rank_agreement(
    candidates: list[dict[str, Any]],
    black_box: list[dict[str, Any]],
    white_box: list[dict[str, Any]],
    target: str,
    pool: Any,
    cycle: int,
    reward: Callable[[str, str], Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Steps 4-5 of a cycle: per prompt, the agreement α = LCS(ρ_B, ρ_W) (§5), Kendall τ, the pool update (§6) and
    the training target (ρ_B or α). `black_box` / `white_box` are rank-store rows (`id`, `ranking`, `judge_raw`,
    `judge_error`). A prompt whose black-box ranking failed keeps `target` None: dropped for this cycle, counted.
    `reward(prompt, response)` (optional, ground truth) adds the mean reward of the samples and of ρ_B's top choice.
    Returns the rows (for `rankings.jsonl`) and the cycle's agreement metrics."""
    from align_distill.data_gen.tokens import prompt_text, response_text
    from align_distill.ranking import agreement_ranking, kendall_tau

    if target not in TARGETS:
        raise ValueError(f"training target must be one of {TARGETS}, got {target!r}")
    by_id_black = {r["id"]: r for r in black_box}
    by_id_white = {r["id"]: r for r in white_box}
    rows, taus, lengths, exact, errors = [], [], [], [], []
    retried = added = 0
    sample_rewards, top_rewards = [], []
    for candidate in candidates:
        b, w = by_id_black[candidate["id"]], by_id_white[candidate["id"]]
        rho_b, rho_w = b["ranking"], w["ranking"]
        retried += int(len(b.get("judge_raw") or []) > 1)
        if reward is not None:
            text = prompt_text(candidate["prompt"])
            values = [_number(reward(text, response_text(c))) for c in candidate["completions"]]
            sample_rewards.append(_mean(values))
            if rho_b is not None:
                top_rewards.append(values[rho_b[0]])
        row = {**candidate, "black_box": rho_b, "white_box": rho_w, "agreement": None, "kendall_tau": None}
        if rho_b is None:  # §2.2: never guessed — the prompt is dropped for this cycle and counted
            errors.append(b.get("judge_error") or "no ranking")
            rows.append({**row, "target": None, "judge_error": errors[-1]})
            continue
        if rho_w is None:  # the white box's scores were not finite: no agreement, ρ_B still trains
            rows.append({**row, "target": list(rho_b) if target == "black_box" else None, "judge_error": None})
            continue
        alpha = agreement_ranking(rho_b, rho_w)
        taus.append(kendall_tau(rho_b, rho_w))
        lengths.append(len(alpha))
        exact.append(float(list(rho_b) == list(rho_w)))
        added += int(pool.add(candidate["prompt"], candidate["completions"], alpha, cycle))
        rows.append(
            {
                **row,
                "agreement": alpha,
                "kendall_tau": taus[-1],
                "target": list(rho_b) if target == "black_box" else alpha,
                "judge_error": None,
            }
        )
    if errors:
        logger.warning("cyclealign: cycle %d: black box failed on %d prompts, e.g. %s", cycle, len(errors), errors[0])
    metrics = {
        "black_box_failures": len(errors),
        "black_box_failure_rate": len(errors) / max(len(candidates), 1),
        "black_box_retried": retried,
        "agreement_tau": _mean(taus),
        "agreement_length": _mean(lengths),
        "agreement_exact": _mean(exact),
        "demonstrations_added": added,
    }
    if reward is not None:
        metrics["sample_reward"] = _mean(sample_rewards)
        metrics["black_box_top_reward"] = _mean(top_rewards)
    return rows, metrics


class CycleAlign:
    """The CycleAlign loop (spec §2) over `prompts` (a dataset with `id` and `prompt`).

    `model` is a loaded white box or a model folder; `black_box` a data_gen `Judge` (default: built from
    `args.black_box`). `callbacks` go to each cycle's `CycleAlignTrainer`. `peft_config` (a `peft.PeftConfig`,
    e.g. `methods.common.peft_config_from(model_args)`) trains a LoRA adapter instead of the full weights.
    `run()` returns the metrics of every cycle (also in `output_dir/cycle_metrics.json`) and leaves the final white
    box in `self.model`; `save(folder)` copies it (full weights, or the adapter) there.
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        tokenizer: Any,
        args: CycleAlignConfig,
        prompts: datasets.Dataset,
        black_box: Any = None,
        callbacks: list | None = None,
        model_loader: Callable[[str], PreTrainedModel] | None = None,
        peft_config: Any = None,
    ):
        from align_distill.cyclealign_judges import DemonstrationPool, make_black_box, static_demonstrations

        if not args.black_box and black_box is None:
            raise ValueError("CycleAlign needs a black box: set `black_box` in the config (kind: llm | noisy_oracle)")
        missing = [c for c in ("id", "prompt") if c not in prompts.column_names]
        if missing:
            raise ValueError(f"CycleAlign prompts need columns id and prompt; missing {missing}")
        self.args, self.tokenizer, self.prompts, self.callbacks = args, tokenizer, prompts, callbacks
        self.model_loader = model_loader or _default_loader
        self.peft_config = peft_config
        self.model: Any = None if isinstance(model, str) else model
        self.model_source = str(model) if isinstance(model, str) else getattr(model, "name_or_path", "") or "in-memory"
        self.initial_source = self.model_source
        self.final_source: str | None = None  # the last cycle's model folder, once run() has finished
        self.owns_black_box = black_box is None
        if black_box is None:
            with _whole_models():  # an LLM judge on every process must be whole, also under ZeRO-3
                black_box = make_black_box(args.black_box)
        self.black_box = black_box
        # what the black-box store's fingerprint records; a judge object given without settings by its class
        judge_class = f"{type(self.black_box).__module__}:{type(self.black_box).__qualname__}"
        self.black_box_settings = args.black_box or {"kind": "callable", "function": judge_class}
        self.static = static_demonstrations(args.static_demonstrations)
        self.pool = DemonstrationPool(self.static, args.demonstration_pool_size, args.min_agreement)
        self.run_dir = Path(args.output_dir)

    # -- helpers ---------------------------------------------------------------------------------------------
    def cycle_dir(self, cycle: int) -> Path:
        return self.run_dir / f"cycle_{cycle}"

    def _check_run(self) -> None:
        """A run folder belongs to one setting: refuse to continue another run's cycles."""
        identity = {
            "model": self.initial_source,
            "cycles": self.args.cycles,
            "num_responses": self.args.num_responses,
            "training_target": self.args.training_target,
            "black_box": self.args.black_box,
            "prompts": len(self.prompts),
            "prompts_per_cycle": self.args.prompts_per_cycle,
            "seed": self.args.seed,
        }
        if self.peft_config is not None:  # an adapter run and a full-weight run do not continue each other
            peft = self.peft_config.to_dict()
            identity["peft"] = {k: sorted(v) if isinstance(v, set) else v for k, v in peft.items()}  # sets: no order
        path = self.run_dir / "cyclealign_run.json"
        stored = json.loads(path.read_text()) if path.exists() else None
        _barrier()  # every process has read it before the main process writes it
        if stored is not None:
            differ = {k: (stored.get(k), v) for k, v in json.loads(json.dumps(identity, default=str)).items()}
            differ = {k: pair for k, pair in differ.items() if pair[0] != pair[1]}
            if differ:
                lines = ", ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in differ.items())
                raise ValueError(f"{self.run_dir} holds another CycleAlign run ({lines}); use a new output_dir")
        elif _process()[0] == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(identity, indent=2, default=str))

    def _dataset_responses(self, prompts: list[dict]) -> dict[str, list]:
        """With `dataset_responses`, each prompt's own responses in the data (spec §9.7), by prompt id."""
        columns = [c for c in DATASET_RESPONSES if c in self.prompts.column_names]
        if not self.args.dataset_responses or not columns:
            return {}
        wanted = {row["id"] for row in prompts}
        found: dict[str, list] = {}
        for row in self.prompts.select_columns(["id", *columns]):
            if row["id"] in wanted:
                found[row["id"]] = [row[c] for c in columns if row[c] is not None]
        return found

    def _ensure_model(self, source: str) -> Any:
        """The white box at `source` (a model folder, or a cycle's adapter folder on the initial model); with
        `peft_config` a trainable LoRA model."""
        if self.model is None or self.model_source != source:
            logger.info("cyclealign: loading the white box from %s", source)
            if (Path(source) / "adapter_config.json").exists():
                from peft import PeftModel

                base = self.model_loader(self.initial_source)
                self.model = PeftModel.from_pretrained(base, source, is_trainable=True)
            else:
                self.model = self.model_loader(source)
            self.model_source = source
        if self.peft_config is not None and not _is_peft(self.model):
            from peft import get_peft_model

            # as TRL's trainers: under ZeRO-3 the adapter keeps the base dtype (mixed dtypes break its all-gather)
            self.model = get_peft_model(self.model, self.peft_config, autocast_adapter_dtype=not _zero3())
        return self.model

    def _sampler(self, model: Any) -> Any:
        """The white box as a `TransformersGenerator` for sampling and likelihood ranking. A LoRA model samples
        through its base model, whose layers carry the adapter. Under ZeRO-3 the parameters are shards: every
        process takes part in gathering them into a whole local copy (LoRA merged), which samples its own part."""
        from align_distill.data_gen.backends.transformers_backend import TransformersGenerator

        base = model.get_base_model() if _is_peft(model) else model
        if not _zero3():
            base.to(self.args.device)
            return TransformersGenerator(base, self.tokenizer, batch_size=self.args.generation_batch_size)
        from align_distill.trainers.common import student_weights

        with _whole_models():
            whole = AutoModelForCausalLM.from_config(
                base.config, dtype=base.dtype, trust_remote_code=self.args.trust_remote_code
            )
        whole.generation_config = base.generation_config
        whole.to(self.args.device)
        sampler = TransformersGenerator(whole, self.tokenizer, batch_size=self.args.generation_batch_size)
        sampler.load_weights(student_weights(model, zero3=True))
        return sampler

    # -- the loop ------------------------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        from align_distill.cyclealign_judges import DemonstrationPool

        self._check_run()
        main = _process()[0] == 0
        history: list[dict[str, Any]] = []
        source = self.initial_source
        try:
            for cycle in range(1, self.args.cycles + 1):
                folder = self.cycle_dir(cycle)
                done = folder / "metrics.json"
                if done.exists():
                    history.append(json.loads(done.read_text()))
                    self.pool = DemonstrationPool.load(folder / "pool.json", self.static)
                    source = str(folder / "model")
                    if main:
                        print(f"cyclealign: cycle {cycle}/{self.args.cycles} done, skipped", flush=True)
                    continue
                metrics = self.run_cycle(cycle, source)
                history.append(metrics)
                source = str(folder / "model")
                if main:
                    (self.run_dir / "cycle_metrics.json").write_text(json.dumps(history, indent=2))
            self._ensure_model(source)
            self.final_source = source
        finally:
            if self.owns_black_box:
                self.black_box.close()
        if main:
            (self.run_dir / "cycle_metrics.json").write_text(json.dumps(history, indent=2))
        _barrier()
        return history

    def save(self, target: str | os.PathLike) -> None:
        """Put the final white box (its folder as the last cycle saved it: weights or adapter, and tokenizer) in
        `target`. A copy, not `save_pretrained`: under ZeRO-3 `self.model` holds only this process's shards."""
        if _process()[0] == 0:
            if self.final_source is None:
                raise ValueError("CycleAlign.save: the loop has not finished; call run() first")
            shutil.copytree(self.final_source, target, dirs_exist_ok=True)
        _barrier()

    def run_cycle(self, cycle: int, source: str) -> dict[str, Any]:
        """One cycle from the white box at `source`; every step resumes from what `cycle_<k>/` already holds.
        Each process samples and ranks its part of the prompts; all read the merged stores."""
        from align_distill.data_gen import load_store, run_rank, run_rollout
        from align_distill.data_gen.judges import LikelihoodJudge, import_function

        args, folder = self.args, self.cycle_dir(cycle)
        rank, world = _process()
        main, parts = rank == 0, {"part": rank, "num_parts": world}
        folder.mkdir(parents=True, exist_ok=True)
        model = self._ensure_model(source)
        metrics: dict[str, Any] = {"cycle": cycle}

        # 1. sample N distinct responses per prompt from the current white box
        prompts = cycle_prompts(self.prompts, cycle, args.cycles, args.prompts_per_cycle)
        if main:
            _write_jsonl(folder / "prompts.jsonl", prompts)
        _barrier()
        generator = self._sampler(model)
        rollout = {
            "input": str(folder / "prompts.jsonl"),
            "output_dir": str(folder / "samples"),
            "model": source,
            "n": args.num_responses * args.oversample,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed + cycle,
            "progress": False,
            **parts,
        }
        run_rollout(rollout, generator=generator)
        _barrier()
        samples = load_store(folder / "samples").to_list()
        extra = self._dataset_responses(prompts)
        candidates = []
        for row in samples:
            distinct = _distinct(row["completions"], args.num_responses)
            distinct += [r for r in _distinct(extra.get(row["id"], []), len(DATASET_RESPONSES)) if r not in distinct]
            if len(distinct) >= 2:
                candidates.append({"id": row["id"], "prompt": row["prompt"], "completions": distinct})
        metrics["prompts"] = len(prompts)
        metrics["dropped_too_few_distinct"] = len(prompts) - len(candidates)
        if not candidates:
            raise RuntimeError(
                f"cycle {cycle}: no prompt got 2 distinct responses out of {rollout['n']} samples; raise "
                "temperature or oversample"
            )
        metrics["candidates_per_prompt"] = _mean([len(c["completions"]) for c in candidates])
        if main:
            _write_jsonl(folder / "candidates.jsonl", candidates)

        # 2. the black box ranks, shown static + dynamic demonstrations from the pool as it was at the cycle start
        from align_distill.cyclealign_judges import ICLRanker, judge_spec

        if main:
            self.pool.save(folder / "demonstrations.json")
        _barrier()
        ranker = ICLRanker(
            self.black_box,
            self.pool,
            args.dynamic_demonstrations,
            args.demonstration_selection,
            args.shuffle_candidates,
            seed=args.seed + cycle,
            max_prompt_chars=args.max_judge_prompt_chars,
        )
        rank_common = {"input": str(folder / "candidates.jsonl"), "progress": False, **parts}
        black_spec = vars(judge_spec(self.black_box_settings))
        run_rank({**rank_common, "output_dir": str(folder / "black_box"), "judge": black_spec}, judge=ranker)

        # 3. the white box ranks by its own length-normalised likelihood (§4), before this cycle's update
        white_spec = {"kind": "likelihood", "model": source, "normalize": args.length_normalise}
        run_rank(
            {**rank_common, "output_dir": str(folder / "white_box"), "judge": white_spec},
            judge=LikelihoodJudge(generator, normalize=args.length_normalise),
        )
        del generator  # under ZeRO-3 a whole copy of the white box: free it before training
        _barrier()
        black = load_store(folder / "black_box").to_list()
        white = load_store(folder / "white_box").to_list()

        # 4.-5. agreement, demonstration pool update, training target (the same on every process)
        reward = import_function(args.reward_function) if args.reward_function else None
        rows, agreement = rank_agreement(candidates, black, white, args.training_target, self.pool, cycle, reward)
        if main:
            _write_jsonl(folder / "rankings.jsonl", rows)
            self.pool.save(folder / "pool.json")
        metrics.update(agreement)

        # 6. train the white box on this cycle's rankings
        train_rows = [
            {"id": r["id"], "prompt": r["prompt"], "completions": r["completions"], "ranking": r["target"]}
            for r in rows
            if r["target"] is not None and len(r["target"]) >= 2
        ]
        metrics["training_prompts"] = len(train_rows)
        trainer = None
        if train_rows:
            trainer, trained = self._train(cycle, model, train_rows, metrics)
            metrics.update(trained)
        else:
            logger.warning("cyclealign: cycle %d has no ranked prompt to train on; the white box is unchanged", cycle)
        self._save_model(model, folder / "model", trainer)
        # The next cycle loads this folder afresh: a trainer's DDP reducer / DeepSpeed engine stays hooked to the
        # module it wrapped, and a second trainer must not wrap the same module again.
        self.model = None
        metrics["demonstration_pool"] = len(self.pool.entries)
        if main:
            done = folder / "metrics.json"
            done.with_suffix(".tmp").write_text(json.dumps(metrics, indent=2))
            done.with_suffix(".tmp").replace(done)
            print(_summary(metrics, args.cycles), flush=True)
        _barrier()
        return metrics

    def _train(
        self, cycle: int, model: Any, rows: list[dict], cycle_metrics: dict
    ) -> tuple[CycleAlignTrainer, dict[str, Any]]:
        """PRO training on the cycle's ranked rows; the cycle's metrics go to the trainer's loggers too."""
        from accelerate.state import AcceleratorState

        args = copy.copy(self.args)
        args.output_dir = str(self.cycle_dir(cycle) / "checkpoints")
        # accelerate refuses a second Accelerator that brings a DeepSpeed plugin into an existing state (the last
        # cycle's trainer): start this cycle's from a fresh state, as new training arguments would
        AcceleratorState._reset_state()
        trainer = CycleAlignTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=self.tokenizer,
            callbacks=self.callbacks,
        )
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last and _process()[0] == 0:
            print(f"cyclealign: cycle {cycle}: resuming training from {last}", flush=True)
        result = trainer.train(resume_from_checkpoint=last)
        metrics = {"train_loss": result.training_loss, "train_steps": result.global_step}
        history = [h for h in trainer.state.log_history if "rank_loss" in h]
        if history:
            metrics.update({k: history[-1][k] for k in ("rank_loss", "sft_nll", "top1_accuracy") if k in history[-1]})
        numbers = {**cycle_metrics, **metrics}
        trainer.log({f"cyclealign/{k}": float(v) for k, v in numbers.items() if isinstance(v, (int, float))})
        return trainer, metrics

    def _save_model(self, model: Any, target: Path, trainer: CycleAlignTrainer | None) -> None:
        """Write the cycle's white box (full weights, or a LoRA model's adapter) and the tokenizer to `target`.
        Every process calls it: under ZeRO-3 saving gathers the shards; the main process writes."""
        from align_distill.trainers.common import gathered

        main = _process()[0] == 0
        tmp = target.with_name(f".{target.name}.tmp")
        if main and tmp.exists():
            shutil.rmtree(tmp)
        _barrier()
        if trainer is not None:
            trainer.save_model(str(tmp))  # the Trainer's own save: ZeRO-3 16-bit gather, PEFT adapter only
        else:
            with gathered(list(model.parameters()), _zero3()):
                if main:
                    model.save_pretrained(tmp)
        if main:
            self.tokenizer.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        _barrier()


def _default_loader(source: str) -> PreTrainedModel:
    from align_distill.models import load_model

    return load_model(source, dtype="auto")


def _summary(metrics: dict[str, Any], cycles: int) -> str:
    def fmt(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    parts = [
        f"cyclealign: cycle {metrics['cycle']}/{cycles}",
        f"prompts {metrics['prompts']} (trained {metrics.get('training_prompts', 0)})",
        f"black-box failures {metrics['black_box_failures']}",
        f"agreement tau {fmt('agreement_tau')} length {fmt('agreement_length')}",
        f"loss {fmt('train_loss')}",
    ]
    if "sample_reward" in metrics:
        parts.append(f"sample reward {fmt('sample_reward')}")
    return " | ".join(parts)
