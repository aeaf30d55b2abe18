"""Every file reference in the docs, recipes and code resolves to a file in the repository.

Three kinds of reference are checked:

- Markdown links and images, `[text](target)`, in Markdown files: resolved relative to the file that holds them
  (web links, `mailto:` and bare `#anchors` are skipped, a `#anchor` suffix is stripped);
- path-like mentions of `.md`, `.yaml`, `.json`, `.py` and `.sh` files that start with one of `PREFIXES`, in any
  scanned file: resolved against the repository root (only these prefixes count, so module names and paths
  inside URLs are not mistaken for references);
- any mention of a Markdown file under the method-spec folder of the team notes: always broken, that folder is
  not part of the repository (the method pages under `docs/methods/` take its place).

Mentions holding a placeholder (`<`, `{`, `*`, `$`) and run outputs (`runs/...`) are skipped. A failure lists every
broken reference as `file:line: reference`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PREFIXES = ("docs", "bench", "scripts", "examples", "configs", "align_distill")
EXTENSIONS = ("md", "yaml", "json", "py", "sh")
PLACEHOLDER = re.compile(r"[<>{}*$]")

# [text](target) and ![alt](target "title"); the target is the first run of non-space characters.
MARKDOWN_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*([^)\s]+)(?:\s+[\"'][^\"']*[\"'])?\s*\)")
# [label]: target   (reference-style link definitions)
MARKDOWN_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(\S+)")
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
INLINE_CODE = re.compile(r"`+[^`]*`+")
FENCE = re.compile(r"^\s*(```|~~~)")

# A path that starts at one of the prefixes: not preceded by a path character or `:` (a `repo:path` or a URL), and
# ending at one of the extensions (not followed by more name characters or a further `.ext`).
PATH_MENTION = re.compile(
    r"(?<![\w./:\\-])((?:" + "|".join(PREFIXES) + r")/[\w./<>{}*$-]*\.(?:" + "|".join(EXTENSIONS) + r"))"
    r"(?![\w/]|\.\w)"
)
# The team's method-spec folder (built from parts so that this file does not mention it itself).
SPEC_MENTION = re.compile(r"\b" + "spec" + r"s/[\w.<>{}*$-]+\.md")


def _files(pattern: str, *folders: str) -> list[Path]:
    found: list[Path] = []
    for folder in folders:
        base = ROOT / folder
        if base.is_dir():
            found += [p for p in base.rglob(pattern) if "__pycache__" not in p.parts]
    return sorted(found)


GROUPS = {
    "readme_and_docs": lambda: [ROOT / "README.md", *_files("*.md", "docs")],
    "other_markdown": lambda: _files("*.md", "examples", "bench", "align_distill", "scripts", "tests"),
    "recipes": lambda: _files("*.yaml", "align_distill/configs", "configs", "examples"),
    "code": lambda: _files("*.py", "align_distill", "bench", "scripts", "tests", "examples"),
}


def _skipped(target: str) -> bool:
    return bool(PLACEHOLDER.search(target)) or target.startswith("runs/") or "/runs/" in target


def _markdown_targets(line: str) -> list[str]:
    text = INLINE_CODE.sub("", line)
    targets = [m.group(1) for m in MARKDOWN_LINK.finditer(text)]
    definition = MARKDOWN_DEFINITION.match(text)
    if definition:
        targets.append(definition.group(1))
    return targets


def _markdown_link_broken(path: Path, target: str) -> str | None:
    """The link target if it does not resolve relative to `path`; None when it resolves or is not a file link."""
    if target.startswith("<") and target.endswith(">"):
        target = target[1:-1]
    if not target or target.startswith("#") or URL_SCHEME.match(target):
        return None
    target = target.split("#", 1)[0].split("?", 1)[0]
    if not target or _skipped(target) or (path.parent / target).exists():
        return None
    return target


def _broken_in_line(path: Path, line: str, markdown: bool) -> list[str]:
    links = _markdown_targets(line) if markdown else []
    broken = [b for b in (_markdown_link_broken(path, target) for target in links) if b is not None]
    for match in PATH_MENTION.finditer(line):
        target = match.group(1)
        if not _skipped(target) and not (ROOT / target).exists():
            broken.append(target)
    for match in SPEC_MENTION.finditer(line):
        if not PLACEHOLDER.search(match.group(0)):
            broken.append(f"{match.group(0)} (the method specs are not in the repository; cite docs/methods/ instead)")
    return list(dict.fromkeys(broken))  # one entry per reference and line


def broken_references(path: Path) -> list[str]:
    """`file:line: reference` for every reference in `path` that does not resolve."""
    rel = path.relative_to(ROOT).as_posix()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        return [f"{rel}:0: not UTF-8 text"]
    broken: list[str] = []
    in_fence = False
    for number, line in enumerate(lines, start=1):
        markdown = path.suffix == ".md"
        if markdown and FENCE.match(line):
            in_fence = not in_fence
            markdown = False
        broken += [
            f"{rel}:{number}: {reference}" for reference in _broken_in_line(path, line, markdown and not in_fence)
        ]
    return broken


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_references_resolve(group: str) -> None:
    files = [p for p in GROUPS[group]() if p.is_file()]
    broken = [entry for path in files for entry in broken_references(path)]
    assert not broken, f"{len(broken)} broken reference(s) in {group}:\n" + "\n".join(broken)


def test_scanner_finds_and_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scanner itself: what counts as a reference, what is skipped, how a failure reads. The sample text is a
    template (`{d}` = the docs folder) so that this file holds no reference of its own."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    d, spec = "docs", "spec" + "s/dckd_adpa.md"
    (tmp_path / d).mkdir()
    (tmp_path / d / "real.md").write_text("x\n")
    page = tmp_path / d / "page.md"
    sample = [
        "[ok](real.md) [ok too](real.md#section) [web](https://example.com/{d}/x.md) [anchor](#top)",
        "[broken](missing.md) and `{d}/real.md` and {d}/gone.yaml",
        "see {d}/methods/dckd_adpa.md §3.2, torch.py, https://host/scripts/run.py, org/repo:scripts/x.py",
        "placeholders: {d}/<name>.md configs/{{method}}.yaml bench/*.json $X/{d}/a.md runs/q/report.md",
        "old: {spec} §3",
        "```python",
        "value = table[key](argument)",
        "```",
    ]
    page.write_text("\n".join(line.format(d=d, spec=spec) for line in sample))
    where = f"{d}/page.md"
    assert broken_references(page) == [
        f"{where}:2: missing.md",
        f"{where}:2: {d}/gone.yaml",
        f"{where}:3: {d}/methods/dckd_adpa.md",
        f"{where}:5: {spec} (the method specs are not in the repository; cite docs/methods/ instead)",
    ]
