"""Train vs validation curves of a trial, with the generalisation gap shaded.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global figure state), so a worker can
draw a trial's curves at its end without touching any display and the report can reuse the same drawing.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Optional, Sequence

TRAIN, VAL, GAP = "#1f77b4", "#d62728", "#ff9896"


def draw_curves(ax_loss, ax_acc, history: Sequence[dict[str, Any]], best_epoch: Optional[int] = None,
                legend: bool = True) -> None:
    """Loss (clean train-eval loss vs validation loss, the gap shaded) and accuracy panels. The penalised
    training loss is left out: an L1/L2 term would set the scale and hide the gap."""
    epochs = [r["epoch"] for r in history]
    tr = [r.get("train_eval_loss", r.get("train_loss")) for r in history]
    va = [r.get("val_loss") for r in history]
    ax_loss.plot(epochs, tr, color=TRAIN, label="train (eval mode)")
    ax_loss.plot(epochs, va, color=VAL, label="validation")
    finite = [(e, a, b) for e, a, b in zip(epochs, tr, va) if _finite(a) and _finite(b)]
    if finite:
        e, a, b = zip(*finite)
        ax_loss.fill_between(e, a, b, where=[y >= x for x, y in zip(a, b)], color=GAP, alpha=0.35,
                             interpolate=True, label="gap (val - train)")
    ax_loss.set_ylabel("loss")
    ax_acc.plot(epochs, [r.get("train_acc") for r in history], color=TRAIN, label="train")
    ax_acc.plot(epochs, [r.get("val_acc") for r in history], color=VAL, label="validation")
    ax_acc.set_ylabel("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if best_epoch is not None and 0 <= best_epoch < len(epochs):
            ax.axvline(epochs[best_epoch], color="gray", ls=":", lw=1)
    if legend:
        ax_loss.legend(fontsize=7, loc="upper right")
        ax_acc.legend(fontsize=7, loc="lower right")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def curves_png(path: str, history: Sequence[dict[str, Any]], title: str, best_epoch: Optional[int] = None,
               dpi: int = 80) -> None:
    """One trial's curves as a PNG file.

    A worker draws one per trial, so the figure is made once per process and thread-safely reused: each call
    removes the previous trial's lines, shaded gap, legends and title and draws anew. Making the figure, its
    axes and their ticks was half of the ~0.1 s a PNG cost; the pixels are identical to a fresh figure's
    (tests/search/test_plots.py)."""
    with _REUSED_LOCK:
        fig, axes, suptitle = _reused_figure()
        for ax in axes:
            for artist in [*ax.lines, *ax.collections]:
                artist.remove()
            if ax.get_legend() is not None:
                ax.get_legend().remove()
            ax.relim()
            ax.autoscale_view()
        draw_curves(*axes, history, best_epoch)
        suptitle.set_text(title)
        fig.savefig(path, dpi=dpi)


@functools.lru_cache(maxsize=1)
def _reused_figure() -> tuple[Any, tuple[Any, Any], Any]:
    """The process's curves figure: (figure, (loss axes, accuracy axes), its title), made on first use."""
    fig = new_figure(8, 3)
    axes = tuple(fig.subplots(1, 2))
    suptitle = fig.suptitle("", fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.88, wspace=0.25)  # tight_layout draws twice
    return fig, axes, suptitle


_REUSED_LOCK = threading.Lock()  # one trial draws on the reused figure at a time
