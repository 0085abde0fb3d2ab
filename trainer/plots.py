"""Training curves as a PNG (Pillow only: no plotting dependency for a picture people look at once)."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#aec7e8"]


def plot_curves(rows: list[dict], keys: list[str], path: Path, title: str = "", size=(640, 360)) -> Path | None:
    """Draw each metric in ``keys`` against ``step`` (rows without the key are skipped).

    Returns the written path, or None when no row holds any of the keys.
    """
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])] for k in keys}
    return plot_series(series, path, title, "step", size)


def plot_series(series: dict[str, list[tuple[float, float]]], path: Path, title: str = "", xlabel: str = "step",
                size=(640, 360), vline: float | None = None) -> Path | None:
    """Draw named (x, y) polylines with a legend (wrapped over as many rows as it needs); ``vline`` marks
    one x. Returns the written path, or None when every series is empty."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    w, h = size
    per_row = max(1, (w - 60) // 150)
    legend_rows = math.ceil(len(series) / per_row)
    left, right, top, bottom = 56, 16, 28 + 14 * legend_rows, 40
    xs = [x for v in series.values() for x, _ in v]
    ys = [y for v in series.values() for _, y in v]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or 0.05
    y0, y1 = y0 - pad, y1 + pad
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=11)

    def px(x, y):
        return left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="#888")
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        _, yy = px(x0, y)
        d.line([left, yy, w - right, yy], fill="#eee")
        d.text((4, yy - 6), f"{y:.3g}", fill="black", font=font)
    for i in range(5):
        x = x0 + (x1 - x0) * i / 4
        xx, _ = px(x, y0)
        d.text((xx - 8, h - bottom + 4), f"{x:.0f}", fill="black", font=font)
    if vline is not None and x0 <= vline <= x1:
        xx, _ = px(vline, y0)
        d.line([xx, top, xx, h - bottom], fill="#999", width=1)
    d.text((w // 2 - 3 * len(xlabel), h - 16), xlabel, fill="black", font=font)
    d.text((left, 6), title, fill="black", font=font)
    for i, (k, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        d.line([px(x, y) for x, y in pts], fill=color, width=2) if len(pts) > 1 else None
        for x, y in pts:
            cx, cy = px(x, y)
            d.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=color)
        d.text((left + 8 + 150 * (i % per_row), 22 + 14 * (i // per_row)), k, fill=color, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
