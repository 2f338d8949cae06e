"""One report document, two renderings: Markdown (renders on a code-hosting site, images linked) and
a self-contained HTML page (images embedded as data URIs, no network needed). The HTML is the Markdown
rendered by markdown-it-py (CommonMark plus tables, raw HTML kept for the <details> blocks) inside a
Jinja2 page template, so both files carry the same text by construction.

The report is built once as a list of blocks, so both files have the same sections by construction:
    ("h", level, text)            heading
    ("p", text)                   paragraph; **bold**, *emphasis* and `code` inline
    ("ul", [item, ...])           bulleted list
    ("table", header, rows)       rows are lists of cell strings
    ("img", "scores.png", alt)    a plot; HTML embeds the SVG of the same stem
    ("code", summary, text)       a collapsible block of JSON
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       max-width: 1200px; margin: 2em auto; padding: 0 1.5em; background: #fff; }
h1 { font-size: 1.8em; border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.35em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 1.8em; }
h3 { font-size: 1.1em; margin-top: 1.4em; }
.table { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fafbfc; }
code { background: #f0f2f4; padding: 1px 4px; border-radius: 4px; font-size: 90%; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 12px; line-height: 1.4; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaecef; }
figcaption { color: #57606a; font-size: 13px; }
details summary { cursor: pointer; font-weight: 600; }
""".strip()


def to_markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            lines += ["#" * b[1] + " " + b[2], ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in b[1]] + [""]
        elif kind == "table":
            header, rows = b[1], b[2]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + " --- |" * len(header))
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{b[2]}]({b[1]})", ""]
        elif kind == "code":
            lines += ["<details>", f"<summary>{html.escape(b[1])}</summary>", "", "```json", b[2].rstrip("\n"),
                      "```", "", "</details>", ""]
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    return "\n".join(lines)


def _data_uri(run_dir: Path, name: str) -> str:
    """The SVG of the plot (sharp at any zoom), else the PNG, base64-encoded."""
    svg = (run_dir / name).with_suffix(".svg")
    if svg.exists():
        return "data:image/svg+xml;base64," + base64.b64encode(svg.read_bytes()).decode()
    return "data:image/png;base64," + base64.b64encode((run_dir / name).read_bytes()).decode()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
{{ css }}
</style>
</head>
<body>
{{ body }}</body>
</html>
"""


def _markdown_it(run_dir: Path):
    """markdown-it-py with three rendering rules of the report's own: headings get an id (links to a
    section), tables scroll inside a div, and a plot (an image alone in its paragraph) becomes a figure
    with the SVG embedded."""
    from markdown_it import MarkdownIt

    # Raw HTML only as whole blocks (the report's own <details> lines); inside text, a "<" that looks
    # like a tag (an error message, a task's prompt) stays text, as the old escaping renderer kept it.
    md = MarkdownIt("commonmark", {"html": True}).enable("table").disable("html_inline")

    def heading_open(renderer, tokens, idx, options, env):
        tokens[idx].attrSet("id", _slug(tokens[idx + 1].content))
        return renderer.renderToken(tokens, idx, options, env)

    def image(renderer, tokens, idx, options, env):
        tok = tokens[idx]
        alt = html.escape(tok.content)
        return (f'<figure><img src="{_data_uri(run_dir, tok.attrGet("src"))}" alt="{alt}">'
                f"<figcaption>{alt}</figcaption></figure>")

    def figure_paragraphs(state):
        toks = state.tokens
        for i in range(1, len(toks) - 1):
            kids = toks[i].children or []
            if toks[i].type == "inline" and len(kids) == 1 and kids[0].type == "image":
                toks[i - 1].hidden = toks[i + 1].hidden = True  # no <p> around a <figure>

    md.core.ruler.push("figure_paragraphs", figure_paragraphs)
    md.add_render_rule("heading_open", heading_open)
    md.add_render_rule("image", image)
    md.add_render_rule("table_open", lambda *a: '<div class="table"><table>\n')
    md.add_render_rule("table_close", lambda *a: "</table></div>\n")
    return md


def to_html(blocks: list[tuple], run_dir: Path, title: str) -> str:
    import jinja2
    from markupsafe import Markup

    body = _markdown_it(run_dir).render(to_markdown(blocks))
    page = jinja2.Environment(autoescape=True).from_string(PAGE)
    return page.render(title=title, css=Markup(CSS), body=Markup(body))
