"""One report document, two renderings: Markdown (renders on a code-hosting site, images linked) and
a self-contained HTML page (images embedded as data URIs, no network needed).

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


def _inline_html(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<em>\1</em>", out)
    return out


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


def to_html(blocks: list[tuple], run_dir: Path, title: str) -> str:
    body: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            body.append(f'<h{b[1]} id="{_slug(b[2])}">{_inline_html(b[2])}</h{b[1]}>')
        elif kind == "p":
            body.append(f"<p>{_inline_html(b[1])}</p>")
        elif kind == "ul":
            body.append("<ul>\n" + "\n".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "\n</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in b[1])
            rows = "\n".join("<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>" for c in row) + "</tr>"
                             for row in b[2])
            body.append(f'<div class="table"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n'
                        "</tbody></table></div>")
        elif kind == "img":
            alt = html.escape(b[2])
            body.append(f'<figure><img src="{_data_uri(run_dir, b[1])}" alt="{alt}">'
                        f"<figcaption>{alt}</figcaption></figure>")
        elif kind == "code":
            body.append(f"<details><summary>{html.escape(b[1])}</summary>\n<pre>{html.escape(b[2])}</pre>\n</details>")
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
