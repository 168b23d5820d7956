"""matplotlib as an optional dependency: one import point with a clear message, and atomic PNG writes."""
from __future__ import annotations

import io
import sys

from .io import atomic_write_bytes


def import_pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def pyplot_or_none(who: str):
    """:func:`import_pyplot`, telling the user how to install matplotlib when it is missing."""
    plt = import_pyplot()
    if plt is None:
        print(f"{who}: matplotlib is not installed, so no plot was written "
              "(pip install 'rosa-peft[plot]' or pip install matplotlib)", file=sys.stderr)
    return plt


def save_png(fig, path: str, dpi: int = 110) -> str:
    """Write ``fig`` to ``path`` atomically, without the software-version metadata (byte-stable output)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    return path


def close_png(fig, plt, path: str, dpi: int = 110) -> str:
    """Lay out ``fig``, write it to ``path`` (:func:`save_png`) and close it, even when the write fails."""
    fig.tight_layout()
    try:
        return save_png(fig, path, dpi=dpi)
    finally:
        plt.close(fig)


def finish(fig, plt, title: str, path: str, dpi: int = 110) -> str:
    """Title, lay out, save and close ``fig``."""
    fig.suptitle(title, fontsize=9 if len(title) > 80 else None)
    return close_png(fig, plt, path, dpi=dpi)
