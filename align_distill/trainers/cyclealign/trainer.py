"""`CycleAlignTrainer`: one cycle's PRO training step — the list-wise ranking loss plus SFT on the top response
(`align_distill.losses.pro_loss`) on prompt / completions / ranking rows (docs/methods/cyclealign.md §7)."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import PreTrainedModel, Trainer

from align_distill.data.tokens import encode_prompt_response
from align_distill.losses import pro_loss
from align_distill.losses.reduction import token_logps
from align_distill.trainers.common import response_view

from .config import CycleAlignConfig

logger = logging.getLogger(__name__)


def tokenize_ranked(row: dict[str, Any], tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    """A ranking row (`prompt`, `completions`, `ranking` best first, possibly shorter than completions) → the
    ranked candidates' `prompt_ids` and `completion_ids`, best first. Responses are tokenized with their prompt by
    TRL's rule (data.tokens), the same ids the white-box judge scored; a response is cut to fit `max_length`."""

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
    """PRO training on ranked responses (cyclealign §7): `train_dataset` rows hold `prompt`, `completions` and
    `ranking`
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
            sft_beta=self.args.sft_weight,
            length_normalise=self.args.length_normalize,
        )
        with torch.no_grad():
            scores = seq_logps / seq_lengths.clamp(min=1) if self.args.length_normalize else seq_logps
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
