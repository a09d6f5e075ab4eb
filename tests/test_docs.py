"""The documentation holds together: every relative link and image in ``README.md`` and
``docs/*.md`` resolves, the README stays a front page, and ``.ci/run`` still finds its test
command in the README. Plain file reads only, no package imports."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); a target may be <...> and may carry a "title".
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)


def _targets(text: str) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    found = [m.group(1).strip("<>") for m in LINK.finditer(text)]
    return found + REFERENCE.findall(text)


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def _fenced_lines(text: str) -> list[str]:
    """What ``sed -n '/^```/,/^```/p' README.md | grep -v '^```'`` prints, as ``.ci/run`` runs it."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if inside:
            lines.append(line)
    return lines


def _fenced_blocks(text: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_docs_pages_exist() -> None:
    assert README.is_file()
    assert len(PAGES) > 1, "docs/ holds no Markdown pages"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    missing = []
    for target in _targets(page.read_text(encoding="utf-8")):
        if _is_external(target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not path:
            continue
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(REPO)}: links to missing files: {missing}"


def test_readme_is_a_front_page() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 300, f"README.md has {n} lines; move sections into docs/"


def test_ci_takes_its_test_command_from_the_readme() -> None:
    lines = _fenced_lines(README.read_text(encoding="utf-8"))
    assert len(lines) >= 2, "README.md has fewer than two lines in fenced blocks"
    cmd = lines[1]
    assert cmd.startswith("pip install"), cmd
    assert "python -m pytest" in cmd, cmd
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    cmd_lines = [line for line in ci.splitlines() if line.startswith("cmd=")]
    assert cmd_lines, ".ci/run has no cmd= line"
    assert any("README.md" in line for line in cmd_lines), cmd_lines


def test_first_block_runs_the_default_sweep() -> None:
    blocks = _fenced_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no fenced block"
    assert any("python -m platform.sweep okdph" in line for line in blocks[0]), blocks[0]
