"""The teacher-signal cache, read into training batches: joined by row id, verified against the batch's token ids.

A `signals` store (see `align_distill.data_gen.jobs.teacher_signals`) holds, per row id and response column, the
prompt ids and response ids it was computed on and each teacher's top-k ids / log-probs per response token. A
trainer asks for batch rows as `(row id, response column)` pairs; the signals come back as `[N, T, K]` tensors
placed where the student's aligned logits are (`response_view`'s convention: position t predicts label t).

Misalignment is never silent: before training every dataset row is checked against the cache (`check_dataset`,
fast, ids only), and every batch compares the tokens it holds with the ids the signals were computed on. A
mismatch is a `SignalsMismatchError` naming the row id, the response and the first differing token.

`BatchSignals` is the one form every teacher source returns (`teachers.sources`): the cache reader, an in-process
model (`live_signals`) and a served model (`teachers.server`) give the same tensors for the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align_distill.data_gen import load_signals


def scatter_rows(mask: torch.Tensor, rows: Sequence[torch.Tensor], fill: float | int = 0) -> torch.Tensor:
    """Place per-row response values (`rows[b]` is `[n_b, ...]`, n_b = mask[b].sum()) onto a `[B, T, ...]` tensor.

    Used to put teacher signals (top-k ids / log-probs per response token) where the student's aligned logits
    are. A count mismatch means the signals and the batch disagree on the response tokens: an error.
    """
    if len(rows) != mask.shape[0]:
        raise ValueError(f"{len(rows)} rows of signals for a batch of {mask.shape[0]}")
    trailing = tuple(rows[0].shape[1:]) if rows else ()
    out = torch.full(
        (*mask.shape, *trailing), fill, dtype=rows[0].dtype if rows else torch.float32, device=mask.device
    )
    for b, row in enumerate(rows):
        n = int(mask[b].sum())
        if row.shape[0] != n:
            raise ValueError(f"batch row {b}: signals cover {row.shape[0]} response tokens, the batch has {n}")
        out[b][mask[b]] = row.to(out.device, out.dtype)
    return out


def batch_sequences(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of each right-padded batch row `[N, L]`: the prompt is everything before the
    first response token, the response the tokens under `completion_mask` (empty rows give `([], [])`)."""
    sequences = []
    for ids, mask in zip(input_ids, completion_mask.bool()):
        positions = mask.nonzero().flatten()
        if positions.numel() == 0:
            sequences.append(([], []))
            continue
        sequences.append((ids[: int(positions[0])].tolist(), ids[mask].tolist()))
    return sequences


class SignalsMismatchError(ValueError):
    """The cached signals and the training data disagree (missing row, other tokens, other teacher)."""


def _first_difference(a: Sequence[int], b: Sequence[int]) -> str:
    for position, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at token {position}: the data has {x}, the cache has {y}"
    return f"lengths differ: the data has {len(a)} tokens, the cache has {len(b)}"


@dataclass
class BatchSignals:
    """Signals of N batch rows, `[N, T, K]` (`ids` int64, `logprobs` float32) and `[N, T]` `token_logprobs`, zero
    outside each row's response positions."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    token_logprobs: torch.Tensor


class TeacherSignalReader:
    """Reads the named `teachers` of a `signals` store for trainers.

    Args:
        path: the store folder written by `align-distill generate signals` (or `run_job("signals", ...)`).
        teachers: teacher names (column prefixes, e.g. `["dpo"]` or `["dpo", "ref"]`) the trainer needs.
        responses: response columns the trainer needs (e.g. `["chosen", "rejected"]` or `["completion"]`).
    """

    def __init__(self, path: str | Path, teachers: Sequence[str], responses: Sequence[str]):

        self.path = str(path)
        try:
            self.cache = load_signals(path)
        except FileNotFoundError as error:
            raise SignalsMismatchError(f"signals cache {self.path}: not found ({error})") from None
        names = [t["name"] for t in self.cache.teachers]
        missing_teachers = [t for t in teachers if t not in names]
        missing_responses = [r for r in responses if r not in self.cache.responses]
        if missing_teachers or missing_responses:
            raise SignalsMismatchError(
                f"signals cache {self.path} has teachers {names} on responses {self.cache.responses}; "
                f"this trainer needs teachers {list(teachers)} on responses {list(responses)}"
            )
        self.teachers, self.responses = list(teachers), list(responses)
        self.top_k = self.cache.encoding.top_k
        self.gathered = {t["name"]: t["gather_at"] for t in self.cache.teachers}

    # -- whole-dataset check, before training ------------------------------------------------------------------
    def check_dataset(self, rows: Any, columns: dict[str, str], prompt_columns: dict[str, str] | None = None) -> None:
        """Every row of `rows` (a dataset or list of dicts with `id` and token-id columns) must be in the cache
        with the same ids. `columns` maps a cache response to the data column holding its ids (e.g.
        `{"chosen": "chosen_ids"}`); `prompt_columns` maps a cache response to the data column holding the prompt
        ids it follows (default `prompt_ids` for every response)."""
        prompt_columns = prompt_columns or {response: "prompt_ids" for response in columns}
        index = self.cache._index
        wanted = ["prompt_ids", *(f"{response}_ids" for response in columns)]
        cached = self.cache.dataset.select_columns(wanted)
        for number, row in enumerate(rows, start=1):
            row_id = str(row["id"])
            if row_id not in index:
                raise SignalsMismatchError(
                    f"row {row_id!r} (data row {number}) is not in the signals cache {self.path} "
                    f"({len(index)} rows); compute the signals on this dataset"
                )
            entry = cached[index[row_id]]
            for response, column in columns.items():
                prompt = list(row[prompt_columns[response]])
                if prompt != list(entry["prompt_ids"]):
                    raise SignalsMismatchError(
                        f"row {row_id!r} (data row {number}): prompt ids differ from the signals cache's "
                        f"({_first_difference(prompt, entry['prompt_ids'])}); tokenizer, chat template or data "
                        "changed since the signals were computed"
                    )
                ids = list(row[column])
                if ids != list(entry[f"{response}_ids"]):
                    raise SignalsMismatchError(
                        f"row {row_id!r} (data row {number}): {response} ids differ from the signals cache's "
                        f"({_first_difference(ids, entry[f'{response}_ids'])})"
                    )

    # -- per batch ---------------------------------------------------------------------------------------------
    def collate(
        self,
        keys: Sequence[tuple[str, str]],
        input_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        teachers: Sequence[str] | None = None,
    ) -> dict[str, BatchSignals]:
        """Signals of each of `teachers` (default: all the reader's) for batch rows `keys[n] = (row id, response)`,
        where row n of `input_ids` / `completion_mask` (`[N, L]`) holds that response. Returns `[N, L-1, K]`
        tensors aligned with `response_view`. A batch response may be a truncated prefix of the cached one (the
        collator's `max_length`), never other tokens."""
        if len(keys) != input_ids.shape[0]:
            raise ValueError(f"{len(keys)} keys for {input_ids.shape[0]} batch rows")
        teachers = list(teachers or self.teachers)
        labels, mask = input_ids[:, 1:], completion_mask[:, 1:].bool()
        rows: dict[str, tuple[list, list, list]] = {teacher: ([], [], []) for teacher in teachers}
        decoded: dict[str, Any] = {}  # a row's responses are decoded together: once per row and batch
        for n, (row_id, response) in enumerate(keys):
            try:
                cached = decoded[row_id] if row_id in decoded else decoded.setdefault(row_id, self.cache[row_id])
            except KeyError:
                raise SignalsMismatchError(
                    f"row {row_id!r} is not in the signals cache {self.path} ({len(self.cache)} rows)"
                ) from None
            signals = cached.responses[response]
            batch_tokens = labels[n][mask[n]].tolist()
            count = len(batch_tokens)
            if signals.response_ids[:count].tolist() != batch_tokens or count > len(signals.response_ids):
                raise SignalsMismatchError(
                    f"row {row_id!r}: the batch's {response} tokens are not the cached ones "
                    f"({_first_difference(batch_tokens, signals.response_ids.tolist())})"
                )
            prompt = input_ids[n][: int(mask[n].nonzero()[0]) + 1].tolist() if count else []
            if count and prompt != cached.prompt_ids.tolist():
                raise SignalsMismatchError(
                    f"row {row_id!r}: the batch's prompt before {response} is not the cached one "
                    f"({_first_difference(prompt, cached.prompt_ids.tolist())})"
                )
            for teacher in teachers:
                entry = signals.teachers[teacher]
                rows[teacher][0].append(entry.topk_ids[:count])
                rows[teacher][1].append(entry.topk_logprobs[:count])
                rows[teacher][2].append(entry.token_logprobs[:count])
        return {
            teacher: BatchSignals(
                ids=scatter_rows(mask, ids, fill=0).long(),
                logprobs=scatter_rows(mask, logprobs, fill=0.0).float(),
                token_logprobs=scatter_rows(mask, tokens, fill=0.0).float(),
            )
            for teacher, (ids, logprobs, tokens) in rows.items()
        }


@torch.no_grad()
def live_signals(
    teacher_logits: torch.Tensor, labels: torch.Tensor, top_k: int, gather_ids: torch.Tensor | None = None
) -> BatchSignals:
    """A live teacher's signals in the cache's form, from its aligned logits `[N, T, V]` and `labels [N, T]`: its
    top-k ids and log-probs (or its log-probs at `gather_ids [N, T, K]`, e.g. the reference at the DPO teacher's ids)
    and the log-prob of each label token — what the `signals` job would store, without the fp16 rounding."""
    logprobs = teacher_logits.float().log_softmax(-1)
    if gather_ids is None:
        values, ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
    else:
        ids, values = gather_ids, logprobs.gather(-1, gather_ids)
    tokens = logprobs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return BatchSignals(ids=ids, logprobs=values, token_logprobs=tokens)
