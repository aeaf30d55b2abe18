"""The teacher-signal cache format: how the `signals` job stores top-k teacher log-probs compactly, and
`load_signals`, which gives trainers tensors per row id.

Columns of a row, for each response r (e.g. chosen, rejected, completion) and teacher t (e.g. dpo, ref):
    prompt_ids                    list<int32>   prompt token ids (chat template applied)
    {r}_ids                       list<int32>   response token ids, T of them
    {r}_{t}_topk_ids              ids of the k entries per token, T·k of them, row-major (absent for a teacher
                                  gathered at another's ids: it uses that teacher's ids)
                                  - "uint16": list<uint16>, when the vocabulary has <= 65536 ids
                                  - "packed": binary, each id in b = ceil(log2 V) bits, little-endian bit order
    {r}_{t}_topk_logprobs         list<float16> T·k log-probs, row-major, descending for an own top-k
    {r}_{t}_rest_logmass          list<float16> T values of log(1 − Σ_k p_k), computed as a logsumexp over the ids
                                  outside the k (exact, not 1 − a rounded sum); −inf when k covers the vocabulary
    {r}_{t}_token_logprobs        list<float16> T log-probs of the response tokens themselves

Bytes per response token and teacher (arrow data, before parquet compression, plus 4 bytes of `{r}_ids` per
token shared by all teachers):
    own top-k:      ids (2k for uint16, ceil(k·b/8) packed) + 2k log-probs + 2 rest + 2 token = 4k + 4 (uint16)
                    → 204 bytes at k = 50 (V <= 65536); 216.5 at V = 151936 (b = 18); 210.25 at V = 128256 (b = 17)
    gathered:       2k + 4 → 104 bytes at k = 50
fp16 keeps log-probs to ~3 significant digits (relative probability error below 0.1 % above log-prob −8, ~1.6 %
near −20, where the probabilities themselves are below 1e-8).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch

from align_distill.data_gen.store import load_store, store_metadata


@dataclass(frozen=True)
class SignalsEncoding:
    top_k: int
    vocab_size: int
    id_encoding: str  # "uint16" | "packed"
    id_bits: int

    @classmethod
    def choose(cls, top_k: int, vocab_size: int, requested: str = "auto") -> SignalsEncoding:
        bits = max(1, (vocab_size - 1).bit_length())
        if requested == "uint16" and vocab_size > 65536:
            raise ValueError(f"id_encoding uint16 holds ids < 65536, but the vocabulary has {vocab_size} ids")
        if requested not in ("auto", "uint16", "packed"):
            raise ValueError(f"id_encoding must be auto, uint16 or packed, got {requested!r}")
        if requested == "packed" or (requested == "auto" and vocab_size > 65536):
            return cls(top_k, vocab_size, "packed", bits)
        return cls(top_k, vocab_size, "uint16", 16)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SignalsEncoding:
        return cls(data["top_k"], data["vocab_size"], data["id_encoding"], data["id_bits"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "top_k": self.top_k,
            "vocab_size": self.vocab_size,
            "id_encoding": self.id_encoding,
            "id_bits": self.id_bits,
        }

    @property
    def ids_type(self) -> pa.DataType:
        return pa.list_(pa.uint16()) if self.id_encoding == "uint16" else pa.binary()

    def bytes_per_token(self, gathered: bool = False) -> float:
        """Arrow bytes per response token for one teacher (see the module docstring)."""
        k = self.top_k
        ids = 0.0 if gathered else (2 * k if self.id_encoding == "uint16" else k * self.id_bits / 8)
        return ids + 2 * k + 4

    def encode_ids(self, ids: np.ndarray) -> np.ndarray | bytes:
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= 2**self.id_bits):
            raise ValueError(
                f"token id {int(flat.max())} does not fit the {self.id_encoding} encoding "
                f"({self.id_bits} bits, vocabulary {self.vocab_size})"
            )
        if self.id_encoding == "uint16":
            return flat.astype(np.uint16)
        bits = (flat[:, None] >> np.arange(self.id_bits, dtype=np.int64)) & 1
        return np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little").tobytes()

    def decode_ids(self, value: Any, tokens: int) -> np.ndarray:
        """[tokens, k] int64 ids from a stored cell (uint16 values or packed bytes)."""
        count = tokens * self.top_k
        if self.id_encoding == "uint16":
            return np.asarray(value, dtype=np.int64).reshape(tokens, self.top_k)
        raw = np.frombuffer(value, dtype=np.uint8)
        bits = np.unpackbits(raw, bitorder="little")[: count * self.id_bits].reshape(count, self.id_bits)
        return (bits.astype(np.int64) << np.arange(self.id_bits, dtype=np.int64)).sum(-1).reshape(tokens, self.top_k)


def fp16(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1).astype(np.float16)


def column_names(response: str, teacher: str) -> dict[str, str]:
    prefix = f"{response}_{teacher}"
    return {
        "topk_ids": f"{prefix}_topk_ids",
        "topk_logprobs": f"{prefix}_topk_logprobs",
        "rest_logmass": f"{prefix}_rest_logmass",
        "token_logprobs": f"{prefix}_token_logprobs",
    }


@dataclass
class TeacherSignals:
    """One teacher on one response: `topk_ids`/`topk_logprobs` [T, k], `rest_logmass`/`token_logprobs` [T]."""

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    rest_logmass: torch.Tensor
    token_logprobs: torch.Tensor


@dataclass
class ResponseSignals:
    response_ids: torch.Tensor
    teachers: dict[str, TeacherSignals]


@dataclass
class RowSignals:
    """All cached signals of one row: the prompt ids and, per response column, its ids and each teacher's signals."""

    id: str
    prompt_ids: torch.Tensor
    responses: dict[str, ResponseSignals]


class SignalsCache(Mapping[str, RowSignals]):
    """Read access to a `signals` store by row id; rows are decoded (to float32 / int64 tensors) on access, the
    store stays memory-mapped."""

    def __init__(self, dataset: datasets.Dataset, metadata: dict[str, Any]):
        signals = metadata["signals"]
        self.dataset = dataset
        self.encoding = SignalsEncoding.from_dict(signals["encoding"])
        self.teachers: list[dict[str, Any]] = signals["teachers"]
        self.responses: list[str] = signals["responses"]
        self._arrow = dataset.with_format("arrow")
        self._index = {row_id: i for i, row_id in enumerate(dataset["id"])}

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __getitem__(self, row_id: str) -> RowSignals:
        if row_id not in self._index:
            raise KeyError(f"row id {row_id!r} is not in the signals cache ({len(self)} rows)")
        row = self._arrow[self._index[row_id]]

        def cell(name: str) -> Any:
            value = row.column(name)[0]
            return value.as_py() if pa.types.is_binary(value.type) else value.values.to_numpy(zero_copy_only=False)

        responses = {}
        for response in self.responses:
            ids = torch.from_numpy(np.asarray(cell(f"{response}_ids"), dtype=np.int64))
            tokens = len(ids)
            teachers: dict[str, TeacherSignals] = {}
            for teacher in self.teachers:
                names = column_names(response, teacher["name"])
                source = teacher["gather_at"] or teacher["name"]
                if teacher["gather_at"]:
                    topk_ids = teachers[source].topk_ids
                else:
                    topk_ids = torch.from_numpy(self.encoding.decode_ids(cell(names["topk_ids"]), tokens))
                teachers[teacher["name"]] = TeacherSignals(
                    topk_ids=topk_ids,
                    topk_logprobs=_float(cell(names["topk_logprobs"])).reshape(tokens, self.encoding.top_k),
                    rest_logmass=_float(cell(names["rest_logmass"])),
                    token_logprobs=_float(cell(names["token_logprobs"])),
                )
            responses[response] = ResponseSignals(response_ids=ids, teachers=teachers)
        prompt_ids = torch.from_numpy(np.asarray(cell("prompt_ids"), dtype=np.int64))
        return RowSignals(id=row_id, prompt_ids=prompt_ids, responses=responses)

    def verify(self, row_id: str, prompt_ids: list[int], response: str, response_ids: list[int]) -> None:
        """Raise ValueError unless a trainer's ids for this row equal the ids the signals were computed on."""
        cached = self[row_id]
        if cached.prompt_ids.tolist() != list(prompt_ids):
            raise ValueError(
                f"row {row_id!r}: prompt ids differ from the signals cache's (tokenizer or chat "
                "template changed since the signals were computed?)"
            )
        if cached.responses[response].response_ids.tolist() != list(response_ids):
            raise ValueError(f"row {row_id!r}: {response} ids differ from the signals cache's")


def _float(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.float32))


def load_signals(path: str | Path, allow_partial: bool = False) -> SignalsCache:
    """The signals store at `path`, keyed by row id."""
    metadata = store_metadata(path)
    if "signals" not in metadata:
        raise ValueError(f"{path}: not a signals store (its manifest has no signals metadata)")
    return SignalsCache(load_store(path, allow_partial=allow_partial), metadata)


def measured_bytes_per_token(dataset: datasets.Dataset, metadata: dict[str, Any]) -> dict[str, float]:
    """Arrow bytes per response token of each teacher's columns (and of the response ids), measured."""
    table = dataset.with_format("arrow")[:]
    signals = metadata["signals"]
    result: dict[str, float] = {}
    tokens = {r: sum(len(x) for x in table.column(f"{r}_ids").to_pylist()) for r in signals["responses"]}
    total = sum(tokens.values())
    for teacher in signals["teachers"]:
        size = 0
        for response in signals["responses"]:
            for column in column_names(response, teacher["name"]).values():
                if column in table.column_names:
                    size += table.column(column).nbytes
        result[teacher["name"]] = size / total if total else math.nan
    result["response_ids"] = sum(table.column(f"{r}_ids").nbytes for r in signals["responses"]) / max(total, 1)
    return result
