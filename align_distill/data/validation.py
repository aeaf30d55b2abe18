"""Validation and normalisation of rows in the `preference`, `completion`, `prompt` and `ranking` formats.

Every problem in every row is collected (nothing stops at the first), so one run tells the user all that is wrong.
Rows that pass are normalised: an implicit prompt is split off, `ranking` is derived from `scores` when absent,
ids become strings (or are added), and a length policy is applied.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .formats import ID_COLUMN, ROLES, FormatSchema, get_format, text_form, type_name
from .lengths import TokenBudget
from .problems import DataProblem

LENGTH_POLICIES = ("error", "drop", "truncate")
FORM_NAMES = {"plain": "plain text", "conversational": "conversational"}


@dataclass
class ValidationReport:
    """What `validate` found: every problem, and the normalised rows that survive the length policy."""

    source: str
    format: str
    problems: list[DataProblem] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)
    form: str | None = None
    """'plain' or 'conversational' (from the first valid row), None when no row was valid."""
    dropped: int = 0
    truncated: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(
    dataset: Iterable[dict[str, Any]],
    format: str,
    source: str = "<memory>",
    tokenizer: Any = None,
    max_length: int | None = None,
    length_policy: str = "error",
) -> ValidationReport:
    """Check every row of `dataset` (a `datasets.Dataset` or any iterable of dicts) against `format`.

    With `max_length` (which needs `tokenizer`), rows whose prompt + longest response exceed it are a problem
    (`length_policy="error"`), are dropped (`"drop"`), or have their responses cut to fit (`"truncate"`; the prompt
    is kept, and a prompt that alone leaves no room is a problem). Row numbers in problems are 1-based.
    """
    schema = get_format(format)
    if length_policy not in LENGTH_POLICIES:
        raise ValueError(f"length_policy must be one of {', '.join(LENGTH_POLICIES)}, got {length_policy!r}")
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length needs a tokenizer to count tokens; got tokenizer=None")
    budget = TokenBudget(tokenizer, max_length) if max_length is not None else None

    records = dataset if hasattr(dataset, "__len__") else list(dataset)
    report = ValidationReport(source=source, format=schema.name)
    present = _present_columns(records)
    absent = _absent_columns(schema, present, source, report)
    has_ids = ID_COLUMN in present
    first_row_of_id: dict[str, int] = {}
    first_form_row: int | None = None

    for row, record in enumerate(records, start=1):
        check = _RowCheck(source, row, absent)
        normalised = _check_row(check, schema, record)
        identifier = _check_id(check, record, first_row_of_id) if has_ids else None
        if normalised is not None and not check.problems:
            form = text_form(normalised["prompt"])
            if report.form is None:
                report.form, first_form_row = form, row
            elif form != report.form:
                check.add(
                    schema.text_columns[0],
                    f"is {FORM_NAMES[form]}, but row {first_form_row} is "
                    f"{FORM_NAMES[report.form]}; one dataset must use one form",
                )
        if check.problems:
            report.problems.extend(check.problems)
            continue
        if normalised is None or absent:  # a whole column is missing: reported once for the column, not per row
            _check_accounted(check, absent, report)
            continue
        if not has_ids:
            identifier = content_id(normalised, schema)  # before truncation, so max_length does not change ids
        if budget is not None:
            normalised = _apply_length_policy(check, schema, normalised, budget, length_policy, report)
            report.problems.extend(check.problems)
            if normalised is None:
                continue
        normalised[ID_COLUMN] = identifier
        report.rows.append(normalised)

    if not has_ids:
        _make_unique(report.rows)
    if len(records) == 0:
        report.problems.append(DataProblem(source, None, None, "has no rows"))
    elif not report.rows and not report.problems:
        report.problems.append(
            DataProblem(
                source,
                None,
                None,
                f"all {len(records)} rows are longer than max_length {max_length} and were dropped; nothing is left",
            )
        )
    return report


def _check_accounted(check: _RowCheck, absent: set[str], report: ValidationReport) -> None:
    """A row left unused must be covered by a problem: its own, or a missing column reported for the dataset."""
    if not absent:
        check.add(None, "was rejected without a reason (an align-distill bug): please report it with this row")
        report.problems.extend(check.problems)


def content_id(row: dict[str, Any], schema: FormatSchema) -> str:
    """16 hex digits of the SHA-256 of the row's format columns (canonical JSON, before any truncation).

    A content hash, not a row index, so ids survive reordering, filtering and appending rows.
    """
    columns = [*schema.required, "ranking", "scores"] if schema.name == "ranking" else list(schema.required)
    payload = {column: row.get(column) for column in columns}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    return digest[:16]


class _RowCheck:
    """Problems of one row; columns that are absent from the whole dataset are already reported once."""

    def __init__(self, source: str, row: int, absent: set[str]):
        self.source, self.row, self.absent = source, row, absent
        self.problems: list[DataProblem] = []

    def add(self, column: str | None, message: str) -> None:
        self.problems.append(DataProblem(self.source, self.row, column, message))

    def value(self, record: dict[str, Any], column: str) -> Any:
        """The cell, or None after reporting it missing."""
        value = record.get(column)
        if value is None and column not in self.absent:
            self.add(column, "missing value (null)" if column in record else "missing column")
        return value


def _present_columns(records: Any) -> set[str]:
    if hasattr(records, "column_names"):
        return set(records.column_names)
    present: set[str] = set()
    for record in records:
        present.update(record)
    return present


def _absent_columns(schema: FormatSchema, present: set[str], source: str, report: ValidationReport) -> set[str]:
    """Required columns that no row has: reported once for the column instead of once per row."""
    if not present:
        return set()
    absent = {column for column in schema.required if column not in present}
    if schema.name == "preference":
        absent.discard("prompt")  # conversational rows may carry an implicit prompt; judged per row
    found = ", ".join(sorted(present))
    for column in sorted(absent):
        report.problems.append(DataProblem(source, None, column, f"missing column (columns found: {found})"))
    if schema.name == "ranking" and not {"ranking", "scores"} & present:
        report.problems.append(
            DataProblem(
                source,
                None,
                "ranking",
                "missing column: give ranking (indices of "
                f"completions, best first) or scores (columns found: {found})",
            )
        )
        absent |= {"ranking", "scores"}
    return absent


def _check_row(check: _RowCheck, schema: FormatSchema, record: dict[str, Any]) -> dict[str, Any] | None:
    if schema.name == "preference":
        return _check_preference(check, record)
    if schema.name == "prompt":
        prompt = check.value(record, "prompt")
        if prompt is None:
            return None
        _check_text(check, "prompt", prompt, ends_with_assistant=False)
        return dict(record)
    if schema.name == "completion":
        return _check_completion(check, record)
    return _check_ranking(check, record)


def _check_completion(check: _RowCheck, record: dict[str, Any]) -> dict[str, Any] | None:
    prompt, completion = check.value(record, "prompt"), check.value(record, "completion")
    if prompt is not None:
        _check_text(check, "prompt", prompt, ends_with_assistant=False)
    if completion is not None:
        _check_text(check, "completion", completion, ends_with_assistant=True)
    if prompt is None or completion is None:
        return None
    _check_same_form(check, record, ("prompt", "completion"))
    return dict(record)


def _check_preference(check: _RowCheck, record: dict[str, Any]) -> dict[str, Any] | None:
    chosen, rejected = check.value(record, "chosen"), check.value(record, "rejected")
    if record.get("prompt") is None:
        if isinstance(chosen, list) and isinstance(rejected, list):
            return _split_implicit_prompt(check, record, chosen, rejected)
        _check_implicit_forms(check, chosen, rejected)
        if not (isinstance(chosen, list) or isinstance(rejected, list)):
            missing = "missing column" if "prompt" not in record else "missing value (null)"
            check.add(
                "prompt",
                f"{missing}; only conversational rows may leave the prompt implicit in chosen and "
                "rejected (their shared leading turns)",
            )
        for column, value in (("chosen", chosen), ("rejected", rejected)):
            if value is not None:
                _check_text(check, column, value, ends_with_assistant=True)
        return None
    _check_text(check, "prompt", record["prompt"], ends_with_assistant=False)
    for column, value in (("chosen", chosen), ("rejected", rejected)):
        if value is not None:
            _check_text(check, column, value, ends_with_assistant=True)
    _check_same_form(check, record, ("prompt", "chosen", "rejected"))
    if chosen is not None and chosen == rejected:
        check.add("rejected", "is identical to chosen; a preference pair needs two different responses")
    return None if chosen is None or rejected is None else dict(record)


def _check_implicit_forms(check: _RowCheck, chosen: Any, rejected: Any) -> None:
    """Without a prompt, a message list beside plain text cannot give the shared leading turns; name the odd one."""
    for column, value, other, other_value in (
        ("chosen", chosen, "rejected", rejected),
        ("rejected", rejected, "chosen", chosen),
    ):
        if isinstance(value, str) and isinstance(other_value, list):
            check.add(
                column,
                f"is plain text, but {other} is a message list; without a prompt column both must be message lists "
                "(the prompt is their shared leading turns): make it a message list or add a prompt column",
            )


def _split_implicit_prompt(
    check: _RowCheck, record: dict[str, Any], chosen: list[Any], rejected: list[Any]
) -> dict[str, Any] | None:
    """TRL's implicit-prompt form: the prompt is the leading turns that chosen and rejected share."""
    before = len(check.problems)
    _check_messages(check, "chosen", chosen)
    _check_messages(check, "rejected", rejected)
    if len(check.problems) > before:
        return None
    if chosen == rejected:
        check.add("rejected", "is identical to chosen; a preference pair needs two different responses")
        return None
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        check.add(
            "prompt", "missing column, and chosen and rejected share no leading turns to serve as the implicit prompt"
        )
        return None
    normalised = {**record, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
    _check_text(check, "prompt", normalised["prompt"], ends_with_assistant=False)
    for column in ("chosen", "rejected"):
        if not normalised[column]:
            check.add(column, "has no turns after the prompt it shares with the other response")
        else:
            _check_text(check, column, normalised[column], ends_with_assistant=True)
    return normalised


def _check_ranking(check: _RowCheck, record: dict[str, Any]) -> dict[str, Any] | None:
    prompt = check.value(record, "prompt")
    if prompt is not None:
        _check_text(check, "prompt", prompt, ends_with_assistant=False)
    elif "prompt" in check.absent:
        return None  # the missing column is reported once, not per row
    completions = check.value(record, "completions")
    count = None
    if completions is not None:
        if not isinstance(completions, list):
            check.add("completions", f"is {type_name(completions)}, expected a list of at least 2 responses")
        elif len(completions) < 2:
            check.add("completions", f"has {len(completions)} response(s), expected at least 2 to rank")
        else:
            count = len(completions)
            for index, completion in enumerate(completions, start=1):
                _check_text(check, "completions", completion, ends_with_assistant=True, item=f"response {index}")
            forms = {text_form(completion) for completion in completions} | {text_form(prompt)}
            if len(forms - {None}) > 1:
                check.add("completions", "mixes plain text and conversational values with its prompt; use one form")
    ranking, scores = record.get("ranking"), record.get("scores")
    if ranking is None and scores is None and "ranking" not in check.absent:
        check.add(
            "ranking", "missing: give ranking (indices of completions, best first) or scores (one per completion)"
        )
    if ranking is not None:
        _check_ranking_order(check, ranking, count)
    if scores is not None:
        _check_scores(check, scores, count)
    if check.problems or count is None:
        return None
    normalised = dict(record)
    if scores is not None:
        by_score = sorted(range(count), key=lambda index: (-scores[index], index))
        if ranking is None:
            normalised["ranking"] = by_score
        elif any(scores[better] < scores[worse] for better, worse in zip(ranking, ranking[1:])):
            check.add("ranking", f"{ranking} disagrees with scores {scores} (a higher score must rank first)")
            return None
    return normalised


def _check_ranking_order(check: _RowCheck, ranking: Any, count: int | None) -> None:
    if not isinstance(ranking, list) or not all(_is_int(index) for index in ranking):
        check.add("ranking", f"is {_describe(ranking)}, expected a list of integer indices into completions")
        return
    if count is None:
        return
    if len(ranking) != count:
        check.add("ranking", f"has {len(ranking)} entries, but completions has {count}; rank every completion once")
    elif sorted(ranking) != list(range(count)):
        repeated = sorted({index for index in ranking if ranking.count(index) > 1})
        missing = sorted(set(range(count)) - set(ranking))
        check.add(
            "ranking",
            f"{ranking} is not a permutation of 0..{count - 1} (repeated: {repeated or 'none'}; "
            f"missing: {missing or 'none'})",
        )


def _check_scores(check: _RowCheck, scores: Any, count: int | None) -> None:
    if not isinstance(scores, list) or not all(_is_number(score) for score in scores):
        check.add("scores", f"is {_describe(scores)}, expected a list of finite numbers, one per completion")
        return
    if count is not None and len(scores) != count:
        check.add("scores", f"has {len(scores)} entries, but completions has {count}; give one score per completion")


def _check_text(check: _RowCheck, column: str, value: Any, *, ends_with_assistant: bool, item: str = "") -> None:
    """A plain string or a message list; `ends_with_assistant` for responses, the opposite for prompts."""
    prefix = f"{item} " if item else ""
    form = text_form(value)
    if form is None:
        check.add(
            column,
            f"{prefix}is {type_name(value)}, expected a string (plain text) or a list of "
            "{role, content} messages (conversational)",
        )
    elif form == "plain":
        if not value.strip():
            check.add(column, f"{prefix}is empty or whitespace-only")
    elif _check_messages(check, column, value, prefix):
        last_role = value[-1]["role"]
        if ends_with_assistant and last_role != "assistant":
            check.add(column, f"{prefix}ends with a {last_role} turn; a response must end with an assistant turn")
        if not ends_with_assistant and last_role == "assistant":
            check.add(
                column,
                f"{prefix}ends with an assistant turn; a prompt must end with the turn the model "
                "answers (user, system or tool)",
            )


def _check_messages(check: _RowCheck, column: str, messages: list[Any], prefix: str = "") -> bool:
    """Structure of a message list; True when every message is a well-formed {role, content} object."""
    before = len(check.problems)
    if not messages:
        check.add(column, f"{prefix}is an empty message list")
    for index, message in enumerate(messages, start=1):
        where = f"{prefix}message {index}"
        if not isinstance(message, dict):
            check.add(column, f"{where} is {type_name(message)}, expected an object with role and content")
            continue
        role = message.get("role")
        if role is None:
            check.add(column, f"{where} has no role")
        elif role not in ROLES:
            check.add(column, f"{where} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is None:
            check.add(column, f"{where} ({role}) has no content")
        elif not isinstance(content, str):
            check.add(column, f"{where} ({role}) content is {type_name(content)}, expected a string")
        elif not content.strip():
            check.add(column, f"{where} ({role}) content is empty or whitespace-only")
    return len(check.problems) == before


def _check_same_form(check: _RowCheck, record: dict[str, Any], columns: tuple[str, ...]) -> None:
    forms = {column: text_form(record.get(column)) for column in columns}
    if len(set(forms.values()) - {None}) > 1:
        detail = ", ".join(f"{column} is {FORM_NAMES[form]}" for column, form in forms.items() if form)
        check.add(columns[-1], f"mixes plain text and conversational values ({detail}); use one form per row")


def _check_id(check: _RowCheck, record: dict[str, Any], first_row_of_id: dict[str, int]) -> str | None:
    value = record.get(ID_COLUMN)
    if value is None:
        check.add(ID_COLUMN, "missing id; when an id column is given, every row needs a unique id")
        return None
    if not (isinstance(value, str) or _is_int(value)) or (isinstance(value, str) and not value.strip()):
        check.add(ID_COLUMN, f"is {_describe(value)}, expected a non-empty string or an integer")
        return None
    identifier = str(value)
    if identifier in first_row_of_id:
        check.add(ID_COLUMN, f"duplicate id {identifier!r} (first used in row {first_row_of_id[identifier]})")
        return None
    first_row_of_id[identifier] = check.row
    return identifier


def _apply_length_policy(
    check: _RowCheck,
    schema: FormatSchema,
    row: dict[str, Any],
    budget: TokenBudget,
    policy: str,
    report: ValidationReport,
) -> dict[str, Any] | None:
    """The row as it fits `budget.max_length` under `policy`, or None when dropped or a problem was reported."""
    prompt = row["prompt"]
    responses = {column: row[column] for column in schema.response_columns}
    if "completions" in responses:
        responses = {f"completions[{i}]": value for i, value in enumerate(row["completions"])}
    if not responses:
        length, exact = budget.measure(prompt)
        longest_column = "prompt"
    else:
        lengths = {column: budget.measure(prompt, value) for column, value in responses.items()}
        longest_column = max(lengths, key=lambda column: lengths[column][0])
        length, exact = lengths[longest_column]
    if length <= budget.max_length:
        return row
    column = longest_column.split("[")[0]
    description = "prompt" if column == "prompt" else f"prompt + {longest_column}"
    if policy == "drop":
        report.dropped += 1
        return None
    if policy == "error" or not responses:
        check.add(column, f"{description} is {_size(length, exact)}, longer than max_length {budget.max_length}")
        return None
    cut = {name: budget.truncate(prompt, value) for name, value in responses.items()}
    if any(value is None for value in cut.values()):
        check.add(
            "prompt",
            f"prompt is {_size(*budget.measure(prompt))} and leaves no room for a response within "
            f"max_length {budget.max_length}; use length_policy='drop' or a larger max_length",
        )
        return None
    truncated = dict(row)
    if "completions" in row:
        truncated["completions"] = list(cut.values())
    else:
        truncated.update(cut)
    if schema.name == "preference" and truncated["chosen"] == truncated["rejected"]:
        check.add(
            "rejected",
            f"is identical to chosen after truncation to max_length {budget.max_length}; use "
            "length_policy='drop' or a larger max_length",
        )
        return None
    report.truncated += 1
    return truncated


def _size(length: int, exact: bool) -> str:
    return f"{length} tokens" if exact else f"at least {length} tokens (counted on its start only)"


def _make_unique(rows: list[dict[str, Any]]) -> None:
    """Rows with identical content (so identical content ids) get '-2', '-3'... in order, so ids stay unique."""
    seen: dict[str, int] = {}
    for row in rows:
        identifier = row[ID_COLUMN]
        seen[identifier] = seen.get(identifier, 0) + 1
        if seen[identifier] > 1:
            row[ID_COLUMN] = f"{identifier}-{seen[identifier]}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _describe(value: Any) -> str:
    """Type and (shortened) value of a list or string; numbers already show their value in `type_name`."""
    if not isinstance(value, (list, str)):
        return type_name(value)
    text = repr(value)
    return f"{type_name(value)} {text if len(text) <= 60 else text[:57] + '...'}"
