"""A report-independent document model: blocks, rendered as self-contained HTML or as Markdown.

A document is a title and a list of blocks (`Heading`, `Para`, `Caution`, `Table`, `Fig`), built once and
rendered twice: `render_html` puts every figure inline as a base64 PNG, `render_md` links each figure to a
file that `write_figures` wrote; `write_document` writes the three as one set. The run report
(`vaerepro.report`) and the sweep report (`vaerepro.sweep.report`) are both built from these blocks.

Also here, the text helpers the reports share: numbers with their standard error and unit (`fmt`, `pm`),
ids (`slug`), nested mappings as dotted keys (`flatten`) and where two differ (`differences`).

Imports nothing from vaerepro, and matplotlib only when `png` is called.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaerepro.files import write_whole

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# --------------------------------------------------------------------------------------------- blocks


@dataclass
class Heading:
    text: str
    level: int = 2  # 2 for a section, 3 for a subsection; the title is the only level 1


@dataclass
class Para:
    text: str


@dataclass
class Caution:
    text: str  # rendered after a bold "WARNING:"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]  # each as long as header, cells already formatted
    kind: str = "table"  # css class; "ranking" tables carry their group in attrs
    attrs: dict[str, str] = field(default_factory=dict)  # html attributes of the table
    row_attrs: list[dict[str, str]] | None = None  # html attributes of each row, one dict per row


@dataclass
class Fig:
    name: str  # file stem under figures/ and html id "fig-<name>"
    alt: str
    png: bytes  # the PNG file's bytes, from `png`
    caption: str = ""


Block = Heading | Para | Caution | Table | Fig


def png(fig: Figure) -> bytes:
    """The PNG bytes of a matplotlib Figure at 100 dpi, without a 'Software' tag (so the bytes depend on
    the figure only). Drawn on an Agg canvas directly: no pyplot, no display backend needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- text


def fmt(value, digits: int = 2, sign: bool = False) -> str:
    """A number with fixed decimals (and a + for positive ones if `sign`), or 'n/a' for missing / non-finite
    values."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return f"{v:{'+' if sign else ''}.{digits}f}" if math.isfinite(v) else "n/a"


def pm(value, se, unit: str, digits: int = 2, sign: bool = False) -> str:
    """'value ± se unit', or 'value unit' without a finite se, or 'n/a' without a finite value."""
    text = fmt(value, digits, sign)
    if text == "n/a":
        return text
    if fmt(se, digits) != "n/a":
        text += f" ± {fmt(se, digits)}"
    return f"{text} {unit}"


def slug(text: str) -> str:
    """Lower-case letters, digits and dashes only: a file stem or html id ('x' when nothing is left)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "x"


def differences(
    recorded: Mapping[str, Any], current: Mapping[str, Any], skip: Iterable[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (value in current, value in recorded)} of each leaf both nested mappings hold with other
    values, in current's order. Not compared: keys under a top-level section named in `skip`, and a key
    only one of them holds (a record written by another version, with other keys)."""
    old, new, skipped = flatten(recorded), flatten(current), tuple(f"{s}." for s in skip)
    return {k: (v, old[k]) for k, v in new.items() if k in old and old[k] != v and not k.startswith(skipped)}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one dict of dotted keys ({"a": {"b": 1}} -> {"a.b": 1}), in the order of `d`;
    leaves (lists included) as they are. `prefix` goes before every key."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------------------------------ rendering

_CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f2f2f2; }
.warning { border: 2px solid #c00; background: #fee; padding: 0.6em 1em; margin: 0.8em 0; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; }
"""


def _attrs(d: Mapping[str, str]) -> str:
    return "".join(f' {k}="{html.escape(v)}"' for k, v in d.items())


def render_html(title: str, blocks: Iterable[Block]) -> str:
    """One self-contained HTML page: inline CSS, every figure an inline base64 PNG."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Caution):
            out.append(f'<div class="warning"><strong>WARNING:</strong> {e(b.text)}</div>')
        elif isinstance(b, Table):
            out.append(f'<table class="{e(b.kind)}"{_attrs(b.attrs)}>')
            out.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr>")
            for i, row in enumerate(b.rows):
                ra = _attrs(b.row_attrs[i]) if b.row_attrs else ""
                out.append(f"<tr{ra}>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
            out.append("</table>")
        elif isinstance(b, Fig):
            data = base64.b64encode(b.png).decode("ascii")
            out.append(f'<figure id="fig-{e(b.name)}">')
            out.append(f'<img src="data:image/png;base64,{data}" alt="{e(b.alt)}">')
            if b.caption:
                out.append(f"<figcaption>{e(b.caption)}</figcaption>")
            out.append("</figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_md(title: str, blocks: Iterable[Block], fig_paths: Mapping[str, str]) -> str:
    """Markdown; `fig_paths` maps each Fig's name to the path of its PNG relative to the Markdown file
    (see `write_figures`). A ranking table is preceded by an html comment carrying its attrs."""
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Caution):
            out += [f"> **WARNING:** {b.text}", ""]
        elif isinstance(b, Table):
            if b.kind == "ranking":
                out.append(f"<!-- ranking-table{_attrs(b.attrs)} -->")
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + "---|" * len(b.header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Fig):
            alt = b.alt.replace("[", "\\[").replace("]", "\\]")
            out += [f"![{alt}]({fig_paths[b.name]})", ""]
            if b.caption:
                out += [f"*{b.caption}*", ""]
    return "\n".join(out)


def write_figures(
    blocks: Iterable[Block],
    fig_dir: Path,
    write: Callable[[Path, bytes], object] = write_whole,
) -> tuple[list[Path], dict[str, str]]:
    """Write each Fig's PNG to fig_dir/<name>.png (creating fig_dir) with `write(path, data)`, and remove
    the PNGs an earlier report left there that this one does not have (fig_dir is the report's own): a
    figure of a comparison no longer made must not be read, or uploaded with the report, as part of it.

    Returns the paths written and, for `render_md` on a Markdown file in fig_dir's parent, each figure's
    name -> "<fig_dir name>/<name>.png".
    """
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths, rel = [], {}
    for b in blocks:
        if isinstance(b, Fig):
            path = fig_dir / f"{b.name}.png"
            write(path, b.png)
            paths.append(path)
            rel[b.name] = f"{fig_dir.name}/{path.name}"
    for stale in set(fig_dir.glob("*.png")) - set(paths):
        stale.unlink()
    return paths, rel


def write_document(
    title: str,
    blocks: Sequence[Block],
    html_path: Path,
    md_path: Path,
    fig_dir: Path,
    write: Callable[[Path, bytes | str], object] = write_whole,
) -> list[Path]:
    """The document as self-contained HTML (html_path) and as Markdown (md_path) linking its figures in
    fig_dir (`write_figures`), as one set; returns the figures' paths.

    Each file is written whole (`write`), and the two documents, the files a reader opens, are removed
    before the figures are written and written after them, the Markdown last: a process killed on the way
    leaves figures without a document, or the new HTML without its Markdown, never a document beside
    another's figures or the other document of an earlier report."""
    html_path.unlink(missing_ok=True)
    md_path.unlink(missing_ok=True)
    figures, rel = write_figures(blocks, fig_dir, write=write)
    write(html_path, render_html(title, blocks))
    write(md_path, render_md(title, blocks, rel))
    return figures
