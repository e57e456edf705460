"""The docs hold together: every relative link in the README, the changelog and docs/
reaches a file of the repository (and a heading, when it names one), none sends a
reader to a file outside it, and the module map of docs/architecture.md is the tree's."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from pydantic import AliasChoices

from jobs.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]"  # [text], one level of [] inside
                         r"\(\s*(<[^>]*>|[^)\s]*)(?:\s+\"[^\"]*\")?\s*\)")  # (target "title")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# Not files of this repository: a reader could not open them.
OUTSIDE_FILES = re.compile(r"\b(?:DESIGN|CONTRACT|STYLE)\.md\b")
MAP_ENTRY = re.compile(r"( *)([^\s,]+(?:, [^\s,]+)*)")  # a module map line's indent and name(s)
MAPPED = ("jobs", "runners", "launcher")  # the folders whose every module the map names


def documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fence = [], ""
    for line in text.splitlines():
        match = FENCE.match(line)
        if match and (not fence or match.group(1)[0] == fence[0]
                      and len(match.group(1)) >= len(fence)):
            fence = "" if fence else match.group(1)
            continue
        if not fence:
            lines.append(line)
    return lines


def _without_code_spans(line: str) -> str:
    return CODE_SPAN.sub("", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lowercased, punctuation dropped, each
    space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in _prose(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    targets = []
    for line in _prose(path.read_text(encoding="utf-8")):
        line = _without_code_spans(line)
        targets += [m.group(1).strip("<>") for m in INLINE_LINK.finditer(line)]
        targets += [m.group(1).strip("<>") for m in REFERENCE.finditer(line)]
    return targets


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with each relative link of a Markdown file: a missing file, a
    heading that is not there, a path that leaves the repository."""
    problems = []
    for target in links(path):
        parts = urlsplit(target)
        if parts.scheme or parts.netloc:
            if parts.scheme == "file":
                problems.append(f"{target}: a file outside the repository")
            continue  # http(s), mailto: not ours to check here
        if parts.path.startswith("/"):
            problems.append(f"{target}: an absolute path; link relative to {path.name}")
            continue
        resolved = (path.parent / unquote(parts.path)).resolve() if parts.path else path
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{target}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif parts.fragment and resolved.suffix == ".md" and (
                unquote(parts.fragment) not in anchors(resolved)):
            problems.append(f"{target}: no heading #{parts.fragment} in {resolved.name}")
    return problems


def module_map(text: str) -> set[str]:
    """The paths the module map of docs/architecture.md names: each line's first column,
    under the folders above it by its indent (two spaces a level)."""
    block = text.split("## Where each module lives", 1)[1].split("```", 2)[1]
    folders: list[str] = []
    named = set()
    for line in block.splitlines():
        match = MAP_ENTRY.match(line)
        level = len(match.group(1)) // 2 if match else 0
        if not match or len(match.group(1)) % 2 or level > len(folders):
            continue  # a description carried on to the next line
        del folders[level:]
        names = match.group(2).split(", ")
        named |= {"".join(folders) + name for name in names}
        if len(names) == 1 and names[0].endswith("/"):
            folders.append(names[0])
    return named


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(path: Path) -> None:
    assert broken_links(path) == [], f"{path.relative_to(ROOT)} has broken links"


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_outside_the_repository_is_named(path: Path) -> None:
    named = [line for line in path.read_text(encoding="utf-8").splitlines()
             if OUTSIDE_FILES.search(line)]
    assert named == [], f"{path.relative_to(ROOT)} sends readers to files it does not have"


def test_the_readme_links_every_page_of_the_docs() -> None:
    linked = {(ROOT / urlsplit(t).path).resolve() for t in links(ROOT / "README.md")}
    pages = set((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    assert {page.resolve() for page in pages} - linked == set()
    assert (ROOT / "CHANGELOG.md").resolve() in linked


def test_the_module_map_names_every_module_and_only_those() -> None:
    named = module_map((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    modules = {path.relative_to(ROOT).as_posix() for folder in MAPPED
               for path in (ROOT / folder).rglob("*.py") if path.name != "__init__.py"}
    assert sorted(name for name in named if not (ROOT / name).exists()) == [], (
        "docs/architecture.md names modules that are not there (moved or renamed?)")
    assert sorted(modules - named) == [], "docs/architecture.md leaves these modules out"


def test_every_setting_is_in_the_contract() -> None:
    section = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8").split(
        "## Environment variables", 1)[1]
    names = [field.validation_alias.choices[0] if isinstance(  # OpenAI's own two
                 field.validation_alias, AliasChoices) else f"{ENV_PREFIX}{name.upper()}"
             for name, field in Settings.model_fields.items()]
    assert [name for name in names if f"`{name}`" not in section] == [], (
        "docs/contract.md's environment variables leave these settings out")


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Its `second` part, too\n",
                                               encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/page.md) [ok too](docs/page.md#its-second-part-too) [web](https://x.org)\n"
        "[gone](docs/missing.md) [no heading](docs/page.md#nowhere)\n"
        "[up](../outside.md) [rooted](/etc/passwd)\n"
        "```\n[in code](docs/ignored.md)\n```\n"
        "`[in a span](docs/ignored.md)`\n", encoding="utf-8")
    problems = broken_links(readme, root=tmp_path)
    assert [p.split(":")[0] for p in problems] == [
        "docs/missing.md", "docs/page.md#nowhere", "../outside.md", "/etc/passwd"]


@pytest.mark.parametrize(("heading", "anchor"), [
    ("How it works", "how-it-works"),
    ("Faults and security", "faults-and-security"),
    ("Ray: runners on a cluster", "ray-runners-on-a-cluster"),
    ("What was tried, and what helped", "what-was-tried-and-what-helped"),
    ("The `OFFLOAD_FSYNC` setting", "the-offload_fsync-setting"),
    ("0.7.0", "070"),
    ("Training and prediction (`train`)", "training-and-prediction-train"),
])
def test_anchors_follow_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor
