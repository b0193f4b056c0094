"""Small server-rendered SVG figures (no script, no external resource): line charts for Dice
and ε per round, bars for the verification. Every label is escaped."""

from __future__ import annotations

import math
from html import escape

from markupsafe import Markup

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _legend(names: list[str], top: float, left: int, width: int) -> tuple[list[str], float]:
    """Legend entries in rows under the plot (never over a label at its right edge); returns the
    SVG parts and the height they take."""
    out, x, y = [], left, top + 12
    for i, name in enumerate(names):
        w = 24 + 7 * len(name)
        if x + w > width and x > left:
            x, y = left, y + 16
        c = PALETTE[i % len(PALETTE)]
        out.append(f"<rect x='{x}' y='{y - 9}' width='10' height='10' fill='{c}'/>"
                   f"<text x='{x + 14}' y='{y}' font-size='11'>{escape(name)}</text>")
        x += w
    return out, (y - top + 8) if names else 0


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, ylabel: str, hline: float | None = None,
               hlabel: str = "", width: int = 560, height: int = 240, ymin: float | None = None,
               xlabel: str = "round", steps: list[tuple[float, float]] | None = None, joined: bool = False,
               xticks: int = 12) -> Markup:
    """Lines of ``series`` (name -> [(x, y)], coloured in its order), the legend under the plot. ``hline``: a dashed
    limit labelled ``hlabel`` at the right; ``steps``: the limit as a stepped line instead
    ([(x from which it holds, value)]: a budget that was raised). ``joined``: a thin grey line
    through every point in x order (one quantity drawn in parts, e.g. ε by what spent it)."""
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    if not pts:
        return Markup(f"<p class='muted'>{escape(title)}: no data yet.</p>")
    limits = [v for _, v in steps or []] + ([hline] if hline is not None else [])
    xs, ys = [p[0] for p in pts], [p[1] for p in pts] + limits
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0 = ymin if ymin is not None else min(0.0, min(ys))
    y1 = max(ys) * 1.05 if max(ys) > y0 else y0 + 1
    L, R, T, B = 52, 90, 26, 34
    sx = lambda x: L + (x - x0) / (x1 - x0) * (width - L - R)  # noqa: E731
    sy = lambda y: height - B - (y - y0) / (y1 - y0) * (height - T - B)  # noqa: E731
    legend, extra = _legend(list(series), height, L, width)
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height + extra:.0f}' role='img' "
           f"aria-label='{escape(title)}' class='chart'><text x='{L}' y='16' font-weight='bold' "
           f"font-size='13'>{escape(title)}</text>"]
    for t in _ticks(y0, y1):
        out.append(f"<line x1='{L}' x2='{width - R}' y1='{sy(t):.1f}' y2='{sy(t):.1f}' stroke='#e4e4e4'/>"
                   f"<text x='{L - 6}' y='{sy(t) + 4:.1f}' font-size='11' text-anchor='end'>{t:.3g}</text>")
    marks = sorted(set(xs))
    every = max(1, math.ceil(len(marks) / xticks))
    for x in marks[::every]:
        out.append(f"<text x='{sx(x):.1f}' y='{height - B + 15}' font-size='11' text-anchor='middle'>{x:g}</text>")
    out.append(f"<text x='{(L + width - R) / 2:.0f}' y='{height - 4}' font-size='11' text-anchor='middle'>"
               f"{escape(xlabel)}</text><text x='12' y='{(T + height - B) / 2:.0f}' font-size='11' "
               f"text-anchor='middle' transform='rotate(-90 12 {(T + height - B) / 2:.0f})'>{escape(ylabel)}</text>")
    if steps:
        cuts = sorted(steps) + [(x1, sorted(steps)[-1][1])]
        path = " ".join(f"{sx(min(max(a, x0), x1)):.1f},{sy(v):.1f} {sx(min(max(b, x0), x1)):.1f},{sy(v):.1f}"
                        for (a, v), (b, _) in zip(cuts, cuts[1:], strict=False))
        out.append(f"<polyline class='limit' fill='none' stroke='#b00020' stroke-dasharray='5,4' points='{path}'/>")
        hline = cuts[-1][1]
    elif hline is not None:
        out.append(f"<line class='limit' x1='{L}' x2='{width - R}' y1='{sy(hline):.1f}' y2='{sy(hline):.1f}' "
                   "stroke='#b00020' stroke-dasharray='5,4'/>")
    if hline is not None:
        out.append(f"<text x='{width - R + 4}' y='{sy(hline) + 4:.1f}' font-size='11' fill='#b00020'>"
                   f"{escape(hlabel)}</text>")
    if joined:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(pts))
        out.append(f"<polyline fill='none' stroke='#bbb' stroke-width='1' points='{path}'/>")
    for i, (name, s) in enumerate(series.items()):  # in the caller's order: the same colour for the same part
        c = PALETTE[i % len(PALETTE)]
        good = [(x, y) for x, y in s if math.isfinite(y)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        out.append(f"<polyline fill='none' stroke='{c}' stroke-width='2' points='{path}' "
                   f"data-series='{escape(name)}'/>")
        out += [f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='{c}'/>" for x, y in good]
    out += legend
    out.append("</svg>")
    return Markup("".join(out))


def bar_chart(groups: dict[str, dict[str, float]], *, title: str, limit: float | None = None,
              limit_label: str = "", width: int = 420, height: int = 200) -> Markup:
    """``groups``: metric -> {model name: value}; values in [0, 1]."""
    names = sorted({n for g in groups.values() for n in g})
    if not names:
        return Markup("")
    L, B, T = 40, 40, 24
    gw = (width - L - 10) / max(1, len(groups))
    bw = gw * 0.8 / len(names)
    sy = lambda y: height - B - max(0.0, min(1.0, y)) * (height - T - B)  # noqa: E731
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
           f"aria-label='{escape(title)}' class='chart'><text x='{L}' y='15' font-weight='bold' font-size='13'>"
           f"{escape(title)}</text>"]
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f"<line x1='{L}' x2='{width - 10}' y1='{sy(t):.1f}' y2='{sy(t):.1f}' stroke='#e4e4e4'/>"
                   f"<text x='{L - 5}' y='{sy(t) + 4:.1f}' font-size='10' text-anchor='end'>{t:g}</text>")
    for gi, (metric, vals) in enumerate(groups.items()):
        gx = L + gi * gw + gw * 0.1
        for ni, n in enumerate(names):
            v = vals.get(n)
            if v is None or not math.isfinite(v):
                continue
            c = PALETTE[ni % len(PALETTE)]
            out.append(f"<rect x='{gx + ni * bw:.1f}' y='{sy(v):.1f}' width='{bw - 2:.1f}' "
                       f"height='{sy(0) - sy(v):.1f}' fill='{c}'><title>{escape(n)}: {v:.3f}</title></rect>"
                       f"<text x='{gx + ni * bw + bw / 2:.1f}' y='{sy(v) - 3:.1f}' font-size='10' "
                       f"text-anchor='middle'>{v:.2f}</text>")
        out.append(f"<text x='{gx + gw * 0.4:.1f}' y='{height - B + 14}' font-size='11' text-anchor='middle'>"
                   f"{escape(metric)}</text>")
    for ni, n in enumerate(names):
        out.append(f"<rect x='{L + ni * 90}' y='{height - 16}' width='10' height='10' "
                   f"fill='{PALETTE[ni % len(PALETTE)]}'/><text x='{L + ni * 90 + 14}' y='{height - 7}' "
                   f"font-size='11'>{escape(n)}</text>")
    if limit is not None:
        out.append(f"<line x1='{L}' x2='{L + gw}' y1='{sy(limit):.1f}' y2='{sy(limit):.1f}' stroke='#b00020' "
                   f"stroke-dasharray='5,4'/><text x='{L + gw}' y='{sy(limit) - 3:.1f}' font-size='10' "
                   f"fill='#b00020' text-anchor='end'>{escape(limit_label)}</text>")
    out.append("</svg>")
    return Markup("".join(out))
