"""Small statistics for the reports: median and p95 over what was measured."""

from __future__ import annotations

import math
import statistics


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100): an observed value, never interpolated.

    With fewer than 20 samples p95 is the maximum; reports give n next to it.
    """
    vs = sorted(v for v in values if v is not None)
    if not vs:
        return None
    rank = max(1, math.ceil(p / 100 * len(vs)))
    return vs[rank - 1]


def summary(values: list[float | None]) -> dict:
    """n, failures (None entries), median, p95, min, max of a series (ms or any unit)."""
    ok = [v for v in values if v is not None]
    out = {"n": len(ok), "missing": len(values) - len(ok)}
    if ok:
        out.update(median=round(statistics.median(ok), 1), p95=round(percentile(ok, 95), 1),
                   min=round(min(ok), 1), max=round(max(ok), 1))
    else:
        out.update(median=None, p95=None, min=None, max=None)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b
