"""Figures to files: HTML that opens offline, and PNG/SVG through kaleido (which needs a Chromium).

:func:`save_figures` writes every HTML file first, then every static image in one kaleido session; a failed
static export leaves the HTML complete and no partial image. ``include_plotlyjs="directory"`` shares one
``plotly.min.js`` among the figures of a folder instead of embedding 4.7 MB in each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import plotly.graph_objects as go

__all__ = ["save_figure", "save_figures", "IMAGE_FORMATS", "PLOTLYJS_FILE", "PngExportError"]


class PngExportError(RuntimeError):
    """PNG/SVG export failed (kaleido needs a Chromium); HTML export still works."""


IMAGE_FORMATS = ("png", "svg")
PLOTLYJS_FILE = "plotly.min.js"
"""Name of the shared plotly.js bundle that ``include_plotlyjs="directory"`` writes beside the figures."""


def _write_plotlyjs(folder: Path) -> Path:
    """``folder/plotly.min.js`` (the installed plotly's bundle), rewritten only when absent or different."""
    from plotly.offline import get_plotlyjs

    path = folder / PLOTLYJS_FILE
    code = get_plotlyjs()
    if not (path.is_file() and path.stat().st_size == len(code.encode()) and path.read_text(encoding="utf-8") == code):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(code, encoding="utf-8")
        tmp.replace(path)
    return path


def save_figure(
    fig: go.Figure,
    path: str | Path,
    *,
    images: Sequence[str] = ("png",),
    include_plotlyjs: bool | str = True,
) -> list[Path]:
    """Write ``path.html`` (offline: plotly.js embedded by default) and one static image per format in ``images``.

    Args:
        images: Any of ``"png"`` and ``"svg"`` (kaleido, which needs a Chromium); ``()`` writes HTML only.

    Raises:
        ValueError: an unknown image format (before anything is written).
        PngExportError: static export failed (kaleido needs Chromium, e.g. ``apt-get install chromium``); the
            HTML file is written before it is attempted.
    """
    base = Path(path).with_suffix("")
    return save_figures({base.name: fig}, base.parent, images=images, include_plotlyjs=include_plotlyjs)


def kaleido_write(jobs: Sequence[tuple[go.Figure, Path]]) -> None:
    """Static images (format from each path's suffix), 1000 px wide, in one kaleido (Chromium) session.

    MathJax is off: no figure here uses LaTeX, and kaleido's default loads it from a CDN, which costs about
    5 s per session (offline, the wait for the network to fail; see ``benchmarks/run.py --only export``).
    """
    import kaleido

    specs = [
        {
            "fig": fig.to_dict(),
            "path": path,
            "opts": {"format": path.suffix[1:], "width": 1000, "height": int(fig.layout.height or 500), "scale": 1},
        }
        for fig, path in jobs
    ]
    kaleido.write_fig_from_object_sync(specs, kopts={"mathjax": False})


def save_figures(
    figures: Mapping[str, go.Figure],
    folder: str | Path,
    *,
    images: Sequence[str] = ("png",),
    include_plotlyjs: bool | str = True,
) -> list[Path]:
    """:func:`save_figure` for several figures: ``folder/<name>.html`` each, then every static image in one
    kaleido session (one browser start instead of one per image; see ``benchmarks/run.py --only export``).

    Args:
        include_plotlyjs: As plotly's ``write_html``: ``True`` embeds plotly.js in every file (offline, ~4.7 MB
            each); ``"directory"`` writes one shared ``folder/plotly.min.js`` and references it relatively
            (offline as long as the folder stays together); ``"cdn"`` needs the network.

    Raises:
        ValueError: an unknown image format (before anything is written).
        PngExportError: static export failed; every HTML file is written and no partial image is left.
    """
    bad = [f for f in images if f not in IMAGE_FORMATS]
    if bad:
        raise ValueError(f"unknown image format(s) {bad}; valid: {list(IMAGE_FORMATS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if include_plotlyjs == "directory":  # one shared bundle beside the figures, referenced relatively
        written.append(_write_plotlyjs(folder))
        include_plotlyjs = PLOTLYJS_FILE
    for name, fig in figures.items():
        html = folder / f"{name}.html"
        tmp = html.with_name(html.name + ".tmp")
        fig.write_html(tmp, include_plotlyjs=include_plotlyjs, full_html=True)
        tmp.replace(html)
        written.append(html)
    jobs = [(fig, folder / f"{name}.{fmt}") for fmt in dict.fromkeys(images) for name, fig in figures.items()]
    if not jobs:
        return written
    parts = [out.with_name(f"{out.stem}.tmp{out.suffix}") for _, out in jobs]  # kaleido reads the suffix
    try:
        kaleido_write([(fig, part) for (fig, _), part in zip(jobs, parts)])
    except Exception as e:  # kaleido raises several types when no browser is available
        for part in parts:
            part.unlink(missing_ok=True)
        names = ", ".join(out.name for _, out in jobs[:3]) + (", ..." if len(jobs) > 3 else "")
        raise PngExportError(
            f"static export of {names} failed ({type(e).__name__}: {e}); kaleido needs a Chromium "
            "(Debian: apt-get install chromium). The HTML versions were written."
        ) from e
    for part, (_, out) in zip(parts, jobs):
        part.replace(out)
        written.append(out)
    return written
