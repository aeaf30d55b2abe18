"""Teacher sources: where a trainer's teacher signals come from (docs/teachers.md).

Every source answers one question, `signals(request) -> BatchSignals`: the teacher's top-k ids and log-probs
(`[N, L-1, K]`) and the log-prob of each label token (`[N, L-1]`) for the batch rows of `request`, aligned like
`trainers.common.response_view`. Three kinds, chosen with `teacher_mode`:

- `model`: a frozen model in this process (`ModelTeacher`); a trainer whose loss reads full logits uses the model
  directly and asks this source only for the top-k form;
- `cache`: a `generate signals` store (`CacheTeacher`, over `signals.TeacherSignalReader`);
- `server`: a vLLM OpenAI-compatible server (`server.ServerTeacher`).

Several teachers are one source too: `MixtureTeacher` (weighted, renormalised over the union of the top-k ids,
`mixture.mix_topk`) or `RoutedTeacher` (each row names its teacher in a dataset column).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import torch

from align_distill.errors import ConfigError, UserError
from align_distill.models.vocab import slice_logits_to_vocab

from .mixture import mix_topk, pad_topk
from .server import ServerTeacher
from .signals import BatchSignals, TeacherSignalReader, live_signals

logger = logging.getLogger(__name__)

KINDS = ("model", "cache", "server")
DEPRECATED_KINDS = {"live": "model"}  # one release


@dataclass
class SignalsRequest:
    """The batch rows a trainer wants signals for: `keys[n] = (row id, response column)` of row n of `input_ids` /
    `completion_mask` (`[N, L]`, right-padded); `gather_ids` (`[N, L-1, K]`) asks for the log-probs at those ids
    instead of an own top-k (ADPA's reference); `routes[n]` names row n's teacher (routing by a dataset column)."""

    keys: list[tuple[str, str]]
    input_ids: torch.Tensor
    completion_mask: torch.Tensor
    attention_mask: torch.Tensor | None = None
    gather_ids: torch.Tensor | None = None
    routes: list[str] | None = None

    def select(self, rows: Sequence[int]) -> SignalsRequest:
        """The request for a subset of its rows."""
        index = torch.tensor(list(rows), dtype=torch.long)

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[index.to(tensor.device)]

        return replace(
            self,
            keys=[self.keys[n] for n in rows],
            input_ids=pick(self.input_ids),
            completion_mask=pick(self.completion_mask),
            attention_mask=pick(self.attention_mask),
            gather_ids=pick(self.gather_ids),
            routes=None if self.routes is None else [self.routes[n] for n in rows],
        )


class TeacherSource(Protocol):
    """What a trainer needs of a teacher (see the module docstring)."""

    name: str
    kind: str

    def signals(self, request: SignalsRequest) -> BatchSignals: ...


class CacheTeacher:
    """Teacher `name` of a `generate signals` store (a gathered reference comes gathered from the job)."""

    kind = "cache"

    def __init__(self, reader: TeacherSignalReader, name: str):
        self.reader, self.name = reader, name

    def signals(self, request: SignalsRequest) -> BatchSignals:
        return self.reader.collate(request.keys, request.input_ids, request.completion_mask, [self.name])[self.name]


class ModelTeacher:
    """A frozen model in this process, in the top-k form (its full logits are `logits(request)`)."""

    kind = "model"

    def __init__(self, model: torch.nn.Module, top_k: int, vocab_size: int, name: str = "teacher"):
        self.model, self.top_k, self.vocab_size, self.name = model, top_k, vocab_size, name

    @torch.no_grad()
    def logits(self, request: SignalsRequest) -> torch.Tensor:
        """Aligned teacher logits `[N, L-1, V]` over the student's vocabulary, on the request's device."""
        device = next(self.model.parameters()).device
        attention = request.attention_mask
        if attention is None:
            attention = torch.ones_like(request.input_ids)
        out = self.model(input_ids=request.input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
        return slice_logits_to_vocab(out.logits, self.vocab_size)[:, :-1].to(request.input_ids.device)

    def signals(self, request: SignalsRequest) -> BatchSignals:
        labels = request.input_ids[:, 1:]
        return live_signals(self.logits(request), labels, self.top_k, gather_ids=request.gather_ids)


class MixtureTeacher:
    """Several teachers with weights: `mixture.mix_topk` of their signals (docs/teachers.md, "Several teachers")."""

    kind = "mixture"

    def __init__(self, sources: Sequence[TeacherSource], weights: Sequence[float], name: str = "mixture"):
        self.sources, self.weights, self.name = list(sources), list(weights), name

    def signals(self, request: SignalsRequest) -> BatchSignals:
        if request.gather_ids is not None:
            raise ConfigError(
                f"teacher {self.name!r}: a mixture of teachers cannot be gathered at another teacher's ids "
                "(ADPA's paper-mode reference); give the reference a single teacher"
            )
        return mix_topk([source.signals(request) for source in self.sources], self.weights)


class RoutedTeacher:
    """Each row's signals from the teacher its dataset column names (`column`), as ms-swift routes teachers."""

    kind = "routed"

    def __init__(self, sources: Mapping[str, TeacherSource], column: str, name: str = "routed"):
        self.sources, self.column, self.name = dict(sources), column, name

    def check_routes(self, rows: Any, where: str = "dataset") -> None:
        """Every row of `rows` names a known teacher in `column` (a `UserError` naming the first that does not)."""
        for number, row in enumerate(rows, start=1):
            route = row.get(self.column)
            if route not in self.sources:
                raise UserError(
                    f"{where} row {number} (id {row.get('id')!r}): column `{self.column}` is {route!r}; it must name "
                    f"one of the teachers {sorted(self.sources)}"
                )

    def signals(self, request: SignalsRequest) -> BatchSignals:
        if request.routes is None:
            raise ValueError(f"teacher {self.name!r}: the batch carries no `{self.column}` routes")
        parts: dict[str, tuple[list[int], BatchSignals]] = {}
        for route in dict.fromkeys(request.routes):
            if route not in self.sources:
                raise UserError(
                    f"column `{self.column}` names teacher {route!r}, not one of {sorted(self.sources)}"
                )
            rows = [n for n, r in enumerate(request.routes) if r == route]
            parts[route] = (rows, self.sources[route].signals(request.select(rows)))
        width = max(s.ids.shape[-1] for _, s in parts.values())
        first = next(iter(parts.values()))[1]
        n, t = request.input_ids.shape[0], first.ids.shape[1]
        out = BatchSignals(
            ids=torch.zeros(n, t, width, dtype=torch.long),
            logprobs=torch.zeros(n, t, width),
            token_logprobs=torch.zeros(n, t),
        )
        for rows, signals in parts.values():
            signals = pad_topk(signals, width)
            index = torch.tensor(rows, dtype=torch.long)
            out.ids[index] = signals.ids.cpu()
            out.logprobs[index] = signals.logprobs.float().cpu()
            out.token_logprobs[index] = signals.token_logprobs.float().cpu()
        return out


# ---- building sources from a config -----------------------------------------------------------------------------


@dataclass
class TeacherSpec:
    """One teacher of a multi-teacher config (`teachers:` list): its `name` (routing value; cache teacher name),
    `kind` and where it is, and its mixture `weight`."""

    name: str
    kind: str = "cache"
    model_name_or_path: str | None = None
    signals_path: str | None = None
    server_url: str | None = None
    server_model: str | None = None
    weight: float = 1.0
    server_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, value: Any, where: str) -> TeacherSpec:
        known = [f.name for f in fields(cls)]
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping with keys {known}, found {value!r}")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; a teacher has {known}")
        if "name" not in value:
            raise ConfigError(f"{where}: every teacher needs a `name`")
        spec = cls(**value)
        spec.kind = canonical_kind(spec.kind, where)
        needs = {"model": "model_name_or_path", "cache": "signals_path", "server": "server_url"}[spec.kind]
        if not getattr(spec, needs):
            raise ConfigError(f"{where}: teacher {spec.name!r} of kind {spec.kind} needs `{needs}`")
        if spec.weight < 0:
            raise ConfigError(f"{where}: teacher {spec.name!r}: weight must be >= 0, found {spec.weight}")
        return spec


_warned: set[str] = set()


def canonical_kind(kind: str, where: str) -> str:
    """`model`, `cache` or `server`; `live` is read as `model` with a deprecation warning (one release, once per
    place it is set)."""
    if kind in DEPRECATED_KINDS:
        if where in _warned:
            return DEPRECATED_KINDS[kind]
        _warned.add(where)
        logger.warning(
            "%s: teacher_mode `%s` is deprecated, use `%s` (the old value stops working in the next release)",
            where,
            kind,
            DEPRECATED_KINDS[kind],
        )
        return DEPRECATED_KINDS[kind]
    if kind not in KINDS:
        raise ConfigError(f"{where}: teacher kind must be one of {', '.join(KINDS)}, found {kind!r}")
    return kind


def canonical_teacher_mode(config: Any) -> None:
    """Map a config's deprecated `teacher_mode: live` to `model` (warning once) and check the value."""
    config.teacher_mode = canonical_kind(config.teacher_mode, f"{type(config).__name__}.teacher_mode")


def teacher_specs(values: Sequence[Any] | None, where: str) -> list[TeacherSpec]:
    """The `teachers:` list of a config as `TeacherSpec`s (names unique)."""
    specs = [TeacherSpec.from_mapping(v, f"{where}[{i}]") for i, v in enumerate(values or [])]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: teacher names must be unique, found {names}")
    return specs


def build_sources(
    specs: Sequence[TeacherSpec],
    *,
    tokenizer: Any,
    top_k: int,
    responses: Sequence[str],
    load_model: Callable[[str, str], torch.nn.Module],
    server_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, TeacherSource]:
    """One source per spec, by name. `load_model(path, name)` loads and places a frozen model (the trainer's way);
    caches at one path share one reader."""
    readers: dict[str, TeacherSignalReader] = {}
    sources: dict[str, TeacherSource] = {}
    for spec in specs:
        if spec.kind == "cache":
            path = str(spec.signals_path)
            wanted = [s.name for s in specs if s.kind == "cache" and str(s.signals_path) == path]
            reader = readers.setdefault(path, TeacherSignalReader(path, wanted, list(responses)))
            sources[spec.name] = CacheTeacher(reader, spec.name)
        elif spec.kind == "server":
            sources[spec.name] = ServerTeacher(
                str(spec.server_url),
                tokenizer,
                top_k,
                name=spec.name,
                model=spec.server_model,
                client_kwargs={**(server_kwargs or {}), **spec.server_kwargs},
            )
        else:
            model = load_model(str(spec.model_name_or_path), spec.name)
            sources[spec.name] = ModelTeacher(model, top_k, len(tokenizer), name=spec.name)
    return sources


def combine(sources: Mapping[str, TeacherSource], specs: Sequence[TeacherSpec], routing_column: str | None):
    """The one source a trainer uses: routed by `routing_column`, else the weighted mixture (one teacher: itself)."""
    if routing_column:
        return RoutedTeacher(sources, routing_column)
    if len(sources) == 1:
        return next(iter(sources.values()))
    return MixtureTeacher([sources[s.name] for s in specs], [s.weight for s in specs])


def readers_of(source: Any) -> list[TeacherSignalReader]:
    """The cache readers inside a source (to check a dataset against them before training)."""
    if isinstance(source, CacheTeacher):
        return [source.reader]
    inner = source.sources.values() if isinstance(source, RoutedTeacher) else getattr(source, "sources", [])
    return [reader for s in inner for reader in readers_of(s)]


def close_sources(source: Any) -> None:
    """Close every server client inside a source."""
    if hasattr(source, "close"):
        source.close()
    inner = source.sources.values() if isinstance(source, RoutedTeacher) else getattr(source, "sources", [])
    for s in inner:
        close_sources(s)
