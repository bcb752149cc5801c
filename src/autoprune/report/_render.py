"""The report as a small document (sections of paragraphs, tables and images) and its two
renderings: Markdown that links the PNGs, and HTML that embeds them so one file is enough."""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from functools import singledispatch
from pathlib import Path


@dataclass(frozen=True)
class Table:
    """Cells as text; ``align`` has one letter per column, ``l`` or ``r`` (numbers)."""

    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    align: str = ""

    def alignment(self) -> str:
        return self.align or "l" + "r" * (len(self.header) - 1)


@dataclass(frozen=True)
class Image:
    path: Path  # a PNG
    title: str


Block = str | Table | Image  # a str is a paragraph of plain text


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    title: str
    intro: str
    sections: list[Section]


def to_markdown(doc: Document, base: Path) -> str:
    """Markdown with image links relative to ``base``, the folder the file is written to."""
    parts = [f"# {doc.title}", doc.intro]
    for section in doc.sections:
        parts.append(f"## {section.title}")
        parts += [_markdown(block, base) for block in section.blocks]
    return "\n\n".join(parts) + "\n"


def to_html(doc: Document) -> str:
    """One self-contained page: inline CSS, images as data URIs, no script, no external file."""
    body = [f"<h1>{html.escape(doc.title)}</h1>", f"<p>{html.escape(doc.intro)}</p>"]
    for section in doc.sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body += [_html(block) for block in section.blocks]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(doc.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# Greys only: the colours on the page come from the plots.
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 68rem;
       margin: 2rem auto; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.75rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; }
th { background: #eee; } tr:nth-child(even) td { background: #f7f7f7; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85rem; color: #555; }
"""


@singledispatch
def _markdown(block: Block, base: Path) -> str:
    raise TypeError(f"no Markdown for {type(block).__name__}")


@_markdown.register
def _(block: str, base: Path) -> str:
    return block


@_markdown.register
def _(block: Table, base: Path) -> str:
    rule = tuple("---:" if a == "r" else "---" for a in block.alignment())
    lines = [block.header, rule, *block.rows]
    return "\n".join("| " + " | ".join(c.replace("|", r"\|") for c in row) + " |" for row in lines)


@_markdown.register
def _(block: Image, base: Path) -> str:
    return f"![{block.title}]({Path(os.path.relpath(block.path, base)).as_posix()})"


@singledispatch
def _html(block: Block) -> str:
    raise TypeError(f"no HTML for {type(block).__name__}")


@_html.register
def _(block: str) -> str:
    return f"<p>{html.escape(block)}</p>"


@_html.register
def _(block: Table) -> str:
    def row(cells: tuple[str, ...], tag: str) -> str:
        aligned = zip(cells, block.alignment(), strict=True)
        return "".join(f'<{tag} class="{a}">{html.escape(c)}</{tag}>' for c, a in aligned)

    rows = "\n".join(f"<tr>{row(r, 'td')}</tr>" for r in block.rows)
    head = f"<tr>{row(block.header, 'th')}</tr>"
    return f"<table>\n<thead>{head}</thead>\n<tbody>\n{rows}\n</tbody>\n</table>"


@_html.register
def _(block: Image) -> str:
    data = base64.b64encode(block.path.read_bytes()).decode("ascii")
    title = html.escape(block.title)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{title}">'
        f"<figcaption>{title}</figcaption></figure>"
    )
