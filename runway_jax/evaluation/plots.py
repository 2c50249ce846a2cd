"""What the evaluation figures share: plain numbers on log axes, the training length marked on
length axes, and PNGs written atomically (a crash leaves the old figure or the new one).

matplotlib is imported inside the functions: only programs that draw need it.
"""

from __future__ import annotations

import math

from runway_jax.files import atomic_write


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_number(value, _position=None) -> str:
    """``12``, ``0.25``, ``1500`` rather than matplotlib's ``1.2x10^1`` on log axes."""
    if value == 0 or not 1e-3 <= abs(value) < 1e6:
        return f"{value:.0e}" if value else "0"
    return f"{value:.6g}"


def plain_log_axis(axis, which: str = "y") -> None:
    """Tick the log-scaled ``which`` axis ("x" or "y") of ``axis`` with plain numbers and no
    minor labels. Call it after plotting: the ticks follow the data's range (evenly spaced round
    numbers within a few-fold range, 1-2-5 steps up to four decades, decades beyond)."""
    from matplotlib import ticker

    part = axis.yaxis if which == "y" else axis.xaxis
    low, high = sorted(axis.get_ylim() if which == "y" else axis.get_xlim())
    decades = math.log10(high / low) if low > 0 else math.inf
    if decades < 0.6:  # under 4x: 1-2-5 steps would leave one tick or none
        locator = ticker.MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10])
    else:
        locator = ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 4 else (1.0,))
    part.set_major_locator(locator)
    part.set_major_formatter(ticker.FuncFormatter(plain_number))
    part.set_minor_formatter(ticker.NullFormatter())


def length_axis(axis, lengths, training_length: int | None) -> None:
    """A log2 x axis ticked at the evaluated ``lengths`` (tokens), the training length among
    them labelled ``"N (train)"`` and marked by a dashed vertical line."""
    from matplotlib import ticker

    ticks = sorted(set(int(n) for n in lengths) | ({int(training_length)} if training_length else set()))
    axis.set_xscale("log", base=2)
    axis.set_xticks(ticks, [f"{n} (train)" if n == training_length else str(n) for n in ticks])
    axis.xaxis.set_minor_locator(ticker.NullLocator())
    if training_length:
        mark_training_length(axis, training_length)


def mark_training_length(axis, training_length: int) -> None:
    """A dashed vertical line at the training length, named in the legend."""
    axis.axvline(training_length, color="gray", linestyle="--", linewidth=1,
                 label=f"training length ({training_length})")


def save_png(figure, path: str, dpi: int = 100) -> None:
    """Lay out ``figure``, write it to ``path`` atomically and close it."""
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    pyplot().close(figure)
