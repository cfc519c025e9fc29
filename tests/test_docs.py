"""The README and docs/ stay navigable: the README is a first-hour guide of at most 250 lines, every page
of docs/ is linked from it directly, and every relative markdown link in the README and in docs/ points at a
file that exists and, with a #fragment, at a heading of that file (GitHub's anchor slugs)."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); the text may hold one level of brackets or inline code
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*[\"')])?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if not any(part.startswith(".") for part in p.parts))


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fence = [], None
    for no, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) <= {fence[0]}:
                fence = None
            continue
        out.append((no, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text (markup dropped), lower-cased, every character that is
    not a letter, digit, underscore, space or hyphen removed, spaces turned into hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(2).strip(), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file: one per heading (a repeated slug gets -1, -2, ...), and explicit
    <a name="..."> / id="..." ones."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        out.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", line))
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside code blocks and code spans."""
    out = []
    for no, line in prose_lines(path.read_text(encoding="utf-8")):
        bare = INLINE_CODE.sub("", line)
        out += [(no, t) for t in LINK.findall(bare)]
        d = REF_DEF.match(bare)
        if d:
            out.append((no, d.group(1)))
    return out


def resolve(src: Path, target: str) -> tuple[Path | None, str | None]:
    """(file, fragment) a relative link points at; (None, None) for a URL with a scheme."""
    if SCHEME.match(target) or target.startswith("//"):
        return None, None
    file_part, _, frag = target.partition("#")
    file_part = unquote(file_part.split("?")[0])
    dest = src if not file_part else (src.parent / file_part)
    return dest.resolve(), (unquote(frag) if frag else None)


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; the first-hour guide keeps to {MAX_README_LINES}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = set()
    for _, target in links(README):
        dest, _ = resolve(README, target)
        if dest is not None:
            linked.add(dest)
    missing = [str(p.relative_to(ROOT)) for p in pages() if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("page", [README, *pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    bad = []
    cache: dict[Path, set[str]] = {}
    for no, target in links(page):
        if not target:
            bad.append(f"{page.name}:{no}: empty link target")
            continue
        dest, frag = resolve(page, target)
        if dest is None:
            continue
        if not dest.exists():
            bad.append(f"{page.name}:{no}: {target}: no such file")
            continue
        if frag is not None:
            if dest.is_dir() or dest.suffix.lower() != ".md":
                bad.append(f"{page.name}:{no}: {target}: an anchor into a file that is not markdown")
                continue
            if dest not in cache:
                cache[dest] = anchors(dest)
            if frag.lower() not in cache[dest]:
                bad.append(f"{page.name}:{no}: {target}: no heading with anchor #{frag} in {dest.name}")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_slugs_follow_github():
    assert slug("Export to GGUF (llama.cpp)") == "export-to-gguf-llamacpp"
    assert slug("`winq bench`: speed, memory, size") == "winq-bench-speed-memory-size"
    assert slug("3. Grids (from WinQ / ParetoQ, arXiv 2605.17471)") == "3-grids-from-winq--paretoq-arxiv-260517471"
    assert slug("Why llama.cpp's numbers differ") == "why-llamacpps-numbers-differ"
    assert slug("Tour: one run, every tool") == "tour-one-run-every-tool"
