"""The page of a multi-seed study (``seeds.html``): which heads come back over injection seeds, and what the
stable ones remove and cost on each seed's test split.

:func:`write_seed_report` lays out the tables the stability stage saved (see
:mod:`biasgym_lens.study.seed_study`) the way a study's ``report.html`` lays out its own
(:mod:`biasgym_lens.study.report`): plotly.js embedded once so the page opens offline, every number with its
95% interval, and a link to each seed's own report. It needs no model.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from biasgym_lens.core.files import read_csv, write_text_atomic
from biasgym_lens.study.figure_files import PngExportError, save_figures
from biasgym_lens.study.report import REPORT_STYLE, figures_html, table_html
from biasgym_lens.study.report_text import MISSING, interval, percent
from biasgym_lens.study.summary_plots import seed_stability_heatmap

logger = logging.getLogger(__name__)

__all__ = ["SeedTables", "write_seed_report", "STABILITY_NOTE", "TABLE_FILES"]

TABLE_FILES: dict[str, tuple[str, ...]] = {
    "per_seed.csv": ("seed", "n_chosen", "chosen", "excess_cut"),
    "overlap.csv": ("seed_a", "seed_b", "k", "shared", "overlap"),
    "membership.csv": ("seed", "layer", "head", "label", "rank", "in_top_k"),
    "stable_heads.csv": ("layer", "head", "label", "n_seeds", "mean_rank"),
    "stable_measures.csv": ("seed", "heads", "excess_cut", "perplexity_increase"),
}
"""The stability stage's tables, in :class:`SeedTables`' order (the last is written last), with the columns
the page reads."""

STABILITY_NOTE = (
    "Each seed's top-k heads of its ranking (the order its faithfulness curve followed), with each head's rank "
    "there; blank where a seed's top k does not hold it. Stable heads (in the top k of more than half of the "
    "seeds) come first."
)


@dataclass(frozen=True)
class SeedTables:
    """The tables of a multi-seed study's stability stage, as saved in its folder (:data:`TABLE_FILES`).

    Attributes:
        per_seed: Each seed's chosen heads and their cuts and cost on its test split, with intervals.
        overlap: Top-k overlap of every pair of seeds.
        membership: Which head is in which seed's top k, at what rank.
        stable: The stable heads, most frequent first.
        measures: The stable heads ablated on each seed's test split (empty when none is stable).
    """

    per_seed: pd.DataFrame
    overlap: pd.DataFrame
    membership: pd.DataFrame
    stable: pd.DataFrame
    measures: pd.DataFrame

    @classmethod
    def read(cls, out: str | Path) -> SeedTables:
        """The tables saved in the multi-seed folder ``out``.

        Raises:
            ArtifactError: a table missing, unreadable or without its columns (naming the file).
        """
        out = Path(out)
        return cls(*(read_csv(out / name, f"{name} table", cols) for name, cols in TABLE_FILES.items()))

    def to_dataframe(self, view: str = "per_seed") -> pd.DataFrame:
        """``"per_seed"``, ``"overlap"``, ``"membership"``, ``"stable"`` or ``"measures"`` (a copy)."""
        views = {"per_seed": self.per_seed, "overlap": self.overlap, "membership": self.membership,
                 "stable": self.stable, "measures": self.measures}
        if view not in views:
            raise ValueError(f"view must be one of {sorted(views)}, got {view!r}")
        return views[view].copy()

    @property
    def k(self) -> int:
        """The top-k compared across seeds."""
        return int(self.overlap["k"].iloc[0]) if len(self.overlap) else 0

    @property
    def stable_heads(self) -> list[tuple[int, int]]:
        """The stable heads as ``(layer, head)`` pairs."""
        return [(int(a), int(b)) for a, b in zip(self.stable["layer"], self.stable["head"])]


def _with_ci(row: Mapping[str, Any], col: str, digits: int = 0) -> str:
    value = percent(row.get(col), digits=digits)
    ci = interval(row.get(f"{col}_ci_low"), row.get(f"{col}_ci_high"), digits=digits)
    return value if ci == MISSING else f"{value} [{ci}]"


_MEASURES = (
    ("Token-excess cut [95% CI]", "excess_cut", 0),
    ("Real-gap cut [95% CI]", "real_gap_cut", 0),
    ("Perplexity increase [95% CI]", "perplexity_increase", 1),
)


def _per_seed_table(per_seed: pd.DataFrame, took: Mapping[int, bool | None]) -> pd.DataFrame:
    rows = []
    for r in per_seed.to_dict("records"):
        cells = {name: _with_ci(r, col, digits) for name, col, digits in _MEASURES}
        ok = took.get(int(r["seed"]))
        rows.append({
            "Seed": int(r["seed"]), "Chosen heads": str(r["chosen"]) if r["n_chosen"] else "none", **cells,
            "Injection took": MISSING if ok is None else ("yes" if ok else "no"),
        })
    return pd.DataFrame(rows)


def _measures_table(measures: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in measures.to_dict("records"):
        cells = {name: _with_ci(r, col, digits) for name, col, digits in _MEASURES}
        budget = {"True": "yes", "False": "no"}.get(str(r.get("within_budget")), MISSING)
        rows.append({"Seed": int(r["seed"]), **cells, "Within budget": budget})
    return pd.DataFrame(rows)


def _overlap_table(overlap: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([
        {"Seeds": f"{int(r['seed_a'])} and {int(r['seed_b'])}", "Shared of top k": f"{int(r['shared'])} of {int(r['k'])}",
         "Overlap": percent(r["overlap"], signed=False)}
        for r in overlap.to_dict("records")
    ])


def _stable_table(stable: pd.DataFrame, n_seeds: int) -> pd.DataFrame:
    return pd.DataFrame([
        {"Head": r["label"], "Seeds with it in their top k": f"{int(r['n_seeds'])} of {n_seeds}",
         "Mean rank there": f"{float(r['mean_rank']):.1f}"}
        for r in stable.to_dict("records")
    ])


def _headline(tables: SeedTables, n_seeds: int) -> str:
    heads = ", ".join(tables.stable["label"])
    if not heads:
        return f"No head is in the top {tables.k} of more than half of the {n_seeds} seeds."
    many = len(tables.stable) != 1
    return (
        f"{len(tables.stable)} head{'s are' if many else ' is'} in the top {tables.k} of more than half of the "
        f"{n_seeds} seeds: {heads}."
    )


def _section(title: str, note: str, table: pd.DataFrame, *, muted: bool = False) -> str:
    body = table_html(table, muted=muted) if len(table) else "<p class='note muted'>(none)</p>"
    return f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(note)}</p>{body}"


def _links_html(links: Mapping[int, str]) -> str:
    items = "".join(f"<li><a href='{html.escape(href)}'>seed {s}: {html.escape(href)}</a></li>" for s, href in links.items())
    return f"<h2>Each seed's study</h2><ul id='seed-reports'>{items}</ul>"


def _body(tables: SeedTables, took: Mapping[int, bool | None], links: Mapping[int, str]) -> list[str]:
    n = len(tables.per_seed)
    weak = [s for s, ok in took.items() if ok is False]
    parts = [f"<div class='headline' id='headline'><span class='tag'>Result</span>{html.escape(_headline(tables, n))}</div>"]
    if weak:
        parts.append(
            f"<div class='headline warn' role='alert'><span class='tag'>Warning</span>The injection did not take for "
            f"seed{'s' if len(weak) > 1 else ''} {', '.join(map(str, weak))}: "
            f"{'their' if len(weak) > 1 else 'its'} cuts measure noise, not findings.</div>"
        )
    parts += [
        _section("Stable heads", "Chosen from the seeds' rankings and chosen counts, which only select and tune data "
                 "shaped.", _stable_table(tables.stable, n)),
        _section("The stable heads on each seed's test split", "Zero-ablating the stable heads together, measured as "
                 "each study measures its chosen heads: the token's excess and the real groups' gap on that seed's "
                 "test probes, the perplexity on its test passages, none of which chose these heads.",
                 _measures_table(tables.measures), muted=bool(weak)),
        _section("Each seed's chosen heads", "From each seed's own scope: its chosen heads, and their cut and cost on "
                 "its test split.", _per_seed_table(tables.per_seed, took), muted=bool(weak)),
        _section(f"Top-{tables.k} overlap between seeds", "How many heads two seeds' top-k lists share.",
                 _overlap_table(tables.overlap)),
    ]
    return parts


def write_seed_report(
    out: str | Path,
    tables: SeedTables,
    *,
    title: str,
    subtitle: str,
    took: Mapping[int, bool | None],
    links: Mapping[int, str],
    images: Sequence[str] = ("png",),
) -> Path:
    """Write ``out/figures/seed_stability.html`` (and its ``images`` formats when kaleido can) and
    ``out/seeds.html``: the stable heads in one sentence, the stable heads measured on each seed's test split,
    each seed's chosen heads and their cut and cost, the top-k overlap, the stability heatmap and a link to each
    seed's report.

    Args:
        out: The multi-seed folder.
        tables: The stability stage's tables.
        title: The page's title.
        subtitle: One line under it (bias, model, seeds, preset).
        took: Seed -> whether its injection took (None: not recorded).
        links: Seed -> its report, relative to ``out``.
        images: Static formats of the figure (a failed export is logged; the page is still complete).

    Returns:
        The page's path.
    """
    out = Path(out)
    figures = [("seed_stability", seed_stability_heatmap(tables.membership, tables.stable_heads), STABILITY_NOTE)]
    try:
        save_figures({name: fig for name, fig, _ in figures}, out / "figures", images=images, include_plotlyjs="directory")
    except PngExportError as e:
        logger.warning("%s; continuing without static images", e)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{REPORT_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='sub'>{html.escape(subtitle)}</p>",
        *_body(tables, took, links),
        figures_html(figures),
        _links_html(links),
        "</body></html>",
    ]
    return write_text_atomic(out / "seeds.html", "\n".join(parts))
