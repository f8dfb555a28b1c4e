"""Bar charts drawn as inline SVG on the server: no script, no chart library, no fetch.

Pure functions of their data. Every label is escaped here, so the result can be placed
in a page as it is. Values are integers (micro-dollars, requests, tokens); the chart
scales them to whole pixels and never sums a float into a total.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape

# Distinguishable on white and for the common colour-vision deficiencies (Okabe-Ito).
PALETTE = (
    "#0072b2",
    "#e69f00",
    "#009e73",
    "#cc79a7",
    "#56b4e9",
    "#d55e00",
    "#f0e442",
    "#000000",
)
OTHER_COLOUR = "#999999"
MAX_SERIES = len(PALETTE)

WIDTH = 640
HEIGHT = 200
_TOP = 10
_BOTTOM = 24  # room for the first and last day under the axis
_LEFT = 4


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    colour: str


def series_for(names: Sequence[str]) -> list[Series]:
    """A colour per name, in order; names past the palette share one "other" colour."""
    return [
        Series(name, PALETTE[i] if i < MAX_SERIES else OTHER_COLOUR) for i, name in enumerate(names)
    ]


def nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (at least 1): a readable scale top."""
    if value <= 1:
        return 1
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def stacked_bars(
    columns: Sequence[str],
    series: Sequence[Series],
    values: Mapping[tuple[str, str], int],
    *,
    label: Callable[[int], str],
    title: str,
) -> str:
    """One bar per column (a day), stacked by series (a model): an ``<svg>`` element.

    ``values`` maps (column, series name) to a non-negative integer; missing pairs are 0.
    Each segment has a ``<title>`` so a pointer (or a screen reader) gets the exact value.
    """
    totals = [sum(max(0, values.get((c, s.name), 0)) for s in series) for c in columns]
    top = nice_ceiling(max(totals, default=0))
    plot_h = HEIGHT - _TOP - _BOTTOM
    slot = (WIDTH - _LEFT) / max(1, len(columns))
    bar_w = max(1.0, slot * 0.8)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{_LEFT}" y1="{HEIGHT - _BOTTOM}" x2="{WIDTH}" y2="{HEIGHT - _BOTTOM}" '
        'stroke="#bbb" stroke-width="1"/>',
    ]
    for index, column in enumerate(columns):
        x = _LEFT + index * slot + (slot - bar_w) / 2
        base = float(HEIGHT - _BOTTOM)
        for item in series:
            value = max(0, values.get((column, item.name), 0))
            if not value:
                continue
            height = plot_h * value / top
            base -= height
            tip = escape(f"{column} · {item.name}: {label(value)}")
            parts.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" height="{height:.1f}" '
                f'fill="{item.colour}"><title>{tip}</title></rect>'
            )
    if columns:
        parts.append(
            f'<text x="{_LEFT}" y="{HEIGHT - 6}" font-size="13" fill="#555">'
            f"{escape(columns[0])}</text>"
        )
        parts.append(
            f'<text x="{WIDTH}" y="{HEIGHT - 6}" font-size="13" fill="#555" '
            f'text-anchor="end">{escape(columns[-1])}</text>'
        )
    parts.append(
        f'<text x="{WIDTH}" y="{_TOP + 2}" font-size="13" fill="#555" text-anchor="end">'
        f"{escape(label(top))}</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


def legend(series: Sequence[Series]) -> str:
    items = "".join(
        f'<li><svg width="10" height="10" aria-hidden="true"><rect width="10" height="10" '
        f'fill="{s.colour}"/></svg> {escape(s.name)}</li>'
        for s in series
    )
    return f'<ul class="legend">{items}</ul>'
