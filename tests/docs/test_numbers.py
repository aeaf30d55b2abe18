"""Every number a doc quotes from a committed benchmark JSON is in that JSON, up to the rounding the doc shows.

A table or paragraph that quotes a JSON carries a marker comment on the line directly above it:

    <!-- source: bench/loss_kernels.json -->
    | variant vs baseline | result |
    | --- | --- |
    | `kd_loss` vs naive KL, V = 49152 | 0.23× extra peak memory (445 vs 1922 MB) |

The block is every line after the marker up to the next blank line. Each number in it must equal some number of
the JSON (collected recursively, signs ignored) once that is rounded to the digits the doc shows: `0.23` matches
0.2315, `445` matches 444.89, `1.5e-7` matches 1.48e-07, `93%` matches 0.93 or 93, `0.23×` is the ratio 0.23.
Sizes and other integer labels in the block (`V = 49152`, `k = 50`) are numbers of the JSON too, so they match.

Not counted as numbers: inline code, link targets, the marker itself, digits glued to letters (`fp32`, `0.5B`,
`ZeRO-3`). A failure lists `file:line: number (not in SOURCE up to its rounding)`.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

MARKER = re.compile(r"<!--\s*source:\s*(\S+?)\s*-->")
INLINE_CODE = re.compile(r"`+[^`]*`+")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
HTML_COMMENT = re.compile(r"<!--.*?-->")
# A number not glued to a word: no letter, digit, `.` or `word-` before it, no letter or digit after it. Thousands
# separators (`1,200`), a decimal part, an exponent (`1.5e-7`, `1e−8`) and a trailing `%` are part of it.
NUMBER = re.compile(
    r"(?<![\w.])(?<!\w-)(?<!\w−)"
    r"((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+−]?\d+)?)(%?)"
    r"(?![\w.]\d|\w)"
)


def doc_files() -> list[Path]:
    """Where markers may be: the README, the docs and the examples' Markdown."""
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "examples").rglob("*.md")]
    return sorted(p for p in files if p.is_file())


def json_numbers(value: Any) -> list[float]:
    """Every number in a parsed JSON document, at any depth (booleans are not numbers)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [abs(float(value))]
    if isinstance(value, dict):
        return [n for v in value.values() for n in json_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in json_numbers(v)]
    return []


def doc_numbers(line: str) -> list[str]:
    """The numbers of one doc line as written (with their `%`), skipping code, link targets and comments."""
    text = HTML_COMMENT.sub(" ", LINK_TARGET.sub("]", INLINE_CODE.sub(" ", line)))
    return [number + percent for number, percent in NUMBER.findall(text)]


def _value_and_tolerance(token: str) -> tuple[float, float]:
    """The number a token shows and half a unit of its last digit (the rounding it can hide)."""
    mantissa, _, exponent = token.replace(",", "").replace("−", "-").lower().partition("e")
    shown = Decimal(mantissa)
    scale = int(exponent) if exponent else 0
    half_unit = Decimal(5).scaleb(shown.as_tuple().exponent - 1 + scale)
    return float(shown.scaleb(scale)), float(half_unit)


def matches(token: str, values: list[float]) -> bool:
    """Whether the doc token equals some JSON number rounded as the token is (a `%` may also be a fraction)."""
    percent = token.endswith("%")
    shown, tolerance = _value_and_tolerance(token.rstrip("%"))
    candidates = [(shown, tolerance)] + ([(shown / 100, tolerance / 100)] if percent else [])
    return any(abs(v - x) <= t * (1 + 1e-9) + 1e-300 for x, t in candidates for v in values)


def sourced_blocks(path: Path) -> list[tuple[int, str, list[tuple[int, str]]]]:
    """(marker line, source, [(line number, text)]) for every marker in `path`; the block ends at a blank line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for index, line in enumerate(lines):
        marker = MARKER.search(line)
        if not marker:
            continue
        block = []
        for number, text in enumerate(lines[index + 1 :], start=index + 2):
            if not text.strip():
                break
            block.append((number, text))
        blocks.append((index + 1, marker.group(1), block))
    return blocks


def problems(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line: ...` for every marker that names no readable JSON or has no block, and every unmatched number."""
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    found: list[str] = []
    for marker_line, source, block in sourced_blocks(path):
        json_path = root / source
        if not (source.endswith(".json") and json_path.is_file()):
            found.append(f"{rel}:{marker_line}: source {source} is not a JSON file of the repository")
            continue
        if not block:
            found.append(f"{rel}:{marker_line}: the marker for {source} has no table or paragraph directly under it")
            continue
        values = json_numbers(json.loads(json_path.read_text(encoding="utf-8")))
        for number, text in block:
            found += [
                f"{rel}:{number}: {token} (not in {source} up to its rounding)"
                for token in doc_numbers(text)
                if not matches(token, values)
            ]
    return found


def test_every_sourced_number_is_in_its_json() -> None:
    files = doc_files()
    markers = [(path, block) for path in files for block in sourced_blocks(path)]
    assert markers, "no `<!-- source: bench/<name>.json -->` marker in README.md, docs/ or examples/"
    found = [entry for path in files for entry in problems(path)]
    assert not found, f"{len(found)} doc number(s) not in the JSON their marker names:\n" + "\n".join(found)


def test_changing_any_sourced_number_fails(tmp_path: Path) -> None:
    """Mutation check on the real docs: each quoted number, changed in a copy of its page, is reported (unless the
    changed value happens to be another number of the same JSON)."""
    checked = 0
    for path in doc_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        for _, source, block in sourced_blocks(path):
            values = json_numbers(json.loads((ROOT / source).read_text(encoding="utf-8")))
            for number, text in block:
                for token in dict.fromkeys(doc_numbers(text)):
                    changed = _changed(token)
                    mutated = text.replace(token, changed, 1)
                    if matches(changed, values) or changed not in doc_numbers(mutated):
                        continue  # an equally valid number, or the first occurrence was not a counted one
                    copy = tmp_path / "page.md"
                    copy.write_text("\n".join([*lines[: number - 1], mutated, *lines[number:]]), encoding="utf-8")
                    assert f"{copy}:{number}: {changed} (not in {source} up to its rounding)" in problems(copy)
                    checked += 1
    assert checked > 0


def _changed(token: str) -> str:
    """`token` with its first digit replaced (1 → 2, ..., 9 → 1) and the same rounding."""
    index = next(i for i, c in enumerate(token) if c.isdigit())
    return token[:index] + str(int(token[index]) % 9 + 1) + token[index + 1 :]


@pytest.mark.parametrize(
    "token,value,ok",
    [
        ("0.23", 0.2314526732496205, True),
        ("0.24", 0.2314526732496205, False),
        ("1.40", 1.4008157226786755, True),
        ("1.4", 1.4008157226786755, True),
        ("445", 444.89453125, True),
        ("444", 444.89453125, False),
        ("1.5e-7", 1.48e-07, True),
        ("1.4e-7", 1.48e-07, False),
        ("93%", 0.93, True),
        ("93%", 93.0, True),
        ("92%", 0.93, False),
        ("1,922", 1922.18359375, True),
        ("49152", 49152, True),
        ("1e-8", 1e-4, False),
    ],
)
def test_rounding_rule(token: str, value: float, ok: bool) -> None:
    assert matches(token, [value]) is ok


# The sample texts below name files of a temporary folder; they are built from BENCH so that this file holds no
# path that tests/docs/test_references.py would look for in the repository.
BENCH = "bench"


def test_what_counts_as_a_number() -> None:
    line = f"| `kd_loss` fp32 ZeRO-3 0.5B [v1]({BENCH}/x1.json) | 0.23× (445 vs 1922 MB), 1.5e-7, 93%, −0.5, 1,200. |"
    assert doc_numbers(line) == ["0.23", "445", "1922", "1.5e-7", "93%", "0.5", "1,200"]
    assert doc_numbers(f"<!-- source: {BENCH}/a1.json --> T = 2048") == ["2048"]


def test_a_changed_doc_number_fails(tmp_path: Path) -> None:
    """A synthetic doc against a synthetic JSON: right as written, and each kind of mistake is reported."""
    source, missing = f"{BENCH}/kernels.json", f"{BENCH}/missing.json"
    (tmp_path / BENCH).mkdir()
    (tmp_path / source).write_text(
        json.dumps([{"vocab": 49152, "mem_ratio": 0.2314526732496205, "extra_mb": 444.89, "kl": 1.48e-07}])
    )
    marker = f"<!-- source: {source} -->"
    good = "\n".join(
        [
            "# Page",
            "",
            marker,
            "| variant | result |",
            "| --- | --- |",
            "| chunked, V = 49152 | 0.23× memory (445 MB), KL 1.5e-7 |",
            "",
            "Unsourced text may say 7 things.",
        ]
    )
    doc = tmp_path / "page.md"
    doc.write_text(good)
    assert problems(doc, root=tmp_path) == []

    for before, after, reported in [
        ("0.23×", "0.25×", f"page.md:6: 0.25 (not in {source} up to its rounding)"),
        ("(445 MB)", "(446 MB)", f"page.md:6: 446 (not in {source} up to its rounding)"),
        ("KL 1.5e-7", "KL 1.4e-7", f"page.md:6: 1.4e-7 (not in {source} up to its rounding)"),
        ("V = 49152", "V = 32000", f"page.md:6: 32000 (not in {source} up to its rounding)"),
        (source, missing, f"page.md:3: source {missing} is not a JSON file of the repository"),
        (marker, marker + "\n", f"page.md:3: the marker for {source} has no table or paragraph directly under it"),
    ]:
        doc.write_text(good.replace(before, after))
        assert problems(doc, root=tmp_path) == [reported]
