"""The report's building blocks and their two renderings, Markdown and self-contained HTML.

A report is built once as a list of blocks and rendered by both :func:`to_markdown` and
:func:`to_html`, so the two files always say the same thing. Tables are
:class:`~privseg.report.tables.Table` blocks, which render themselves.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass

from privseg.report.tables import Table

"""The two renderings of a study's report, in the study folder."""


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Note:
    """A one-line remark (kind "note") or a caveat the reader must not miss (kind "warning")."""

    text: str
    kind: str = "note"


@dataclass
class Image:
    rel_path: str
    data: bytes
    caption: str


@dataclass
class Code:
    text: str
    lang: str = ""


Block = Heading | Para | Note | Image | Code | Table


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for blk in blocks:
        if isinstance(blk, Heading):
            out.append("#" * blk.level + " " + blk.text)
        elif isinstance(blk, Para):
            out.append(blk.text)
        elif isinstance(blk, Note):
            out.append(("> **Caveat:** " if blk.kind == "warning" else "> ") + blk.text)
        elif isinstance(blk, Image):
            out.append(f"![{blk.caption}]({blk.rel_path})\n\n*{blk.caption}*")
        elif isinstance(blk, Code):
            out.append(f"```{blk.lang}\n{blk.text}\n```")
        else:
            out.append(blk.to_markdown())
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1000px;
  margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
caption { caption-side: bottom; font-style: italic; color: #555; padding-top: .4em;
  text-align: left; }
th, td { border: 1px solid #ddd; padding: .3em .6em; }
th { background: #f2f2f2; }
th, td { text-align: left; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-style: italic; color: #555; font-size: .9em; }
.note { color: #555; font-style: italic; }
.warning { background: #fff4e5; border-left: 4px solid #f0a030; padding: .6em 1em; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: .85em; }
"""
"""Inline style sheet: the HTML report is one file, with figures as data URIs and no links."""


def to_html(blocks: list[Block], title: str = "privseg study report") -> str:
    body: list[str] = []
    for blk in blocks:
        if isinstance(blk, Heading):
            body.append(f"<h{blk.level}>{html.escape(blk.text)}</h{blk.level}>")
        elif isinstance(blk, Para):
            body.append(f"<p>{html.escape(blk.text)}</p>")
        elif isinstance(blk, Note):
            label = "<strong>Caveat:</strong> " if blk.kind == "warning" else ""
            body.append(f'<p class="{blk.kind}">{label}{html.escape(blk.text)}</p>')
        elif isinstance(blk, Image):
            uri = "data:image/png;base64," + base64.b64encode(blk.data).decode("ascii")
            cap = html.escape(blk.caption)
            body.append(
                f'<figure><img src="{uri}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'
            )
        elif isinstance(blk, Code):
            body.append(f"<pre><code>{html.escape(blk.text)}</code></pre>")
        else:
            body.append(blk.to_html())
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
