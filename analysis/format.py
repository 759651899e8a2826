"""What every report and page shares: a number over seeds as `mean ± std`, and the self-contained HTML page
(inline style, no external files) each report and rollouts page is written as."""

from __future__ import annotations

import html
import math

# tables of annotated rollouts: the study's and the text study's pages
ROLLOUT_STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}"
                 "table{border-collapse:collapse}"
                 "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top}"
                 "pre{margin:0;white-space:pre-wrap}.thought{color:#c2185b}sub{color:#777}")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def fmt(stat: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    """{"mean", "std"} -> "mean ± std" (times `scale`); "-" for a missing number."""
    if stat is None:
        return "-"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def html_page(title: str, body: str, style: str) -> str:
    """One self-contained page: `body` is HTML, `title` is text."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")
