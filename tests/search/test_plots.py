"""curves_png reuses one figure per process (issue 15: half of a PNG's cost was making the figure): its output
must be pixel-identical to a freshly made figure's, whatever trial it drew before."""

from __future__ import annotations

import math
import threading

import numpy as np
from PIL import Image

from regsweep.search.plots import curves_png, draw_curves, new_figure


def _fresh(path, history, title, best_epoch=None, dpi=80):
    """The drawing as a new figure makes it (curves_png before the figure was reused)."""
    fig = new_figure(8, 3)
    ax_loss, ax_acc = fig.subplots(1, 2)
    draw_curves(ax_loss, ax_acc, history, best_epoch)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.88, wspace=0.25)
    fig.savefig(path, dpi=dpi)


def _history(n, scale, bad_at=None):
    out = []
    for e in range(n):
        val = scale * 1.2 / (e + 1) + 0.01 * e
        out.append({"epoch": e, "train_loss": scale / (e + 1), "train_eval_loss": scale / (e + 1),
                    "val_loss": math.nan if e == bad_at else val, "train_acc": 1 - 1 / (e + 2),
                    "val_acc": 1 - 1.1 / (e + 2)})
    return out


def _pixels(path):
    return np.asarray(Image.open(path))


def test_a_reused_figure_draws_exactly_what_a_fresh_one_draws(tmp_path):
    cases = [(_history(40, 9.0, bad_at=5), "trial 7 long", 3), (_history(12, 1.0), "trial 0", None),
             (_history(1, 2.0), "one epoch", 0), (_history(12, 1.0), "trial 0 again", 11)]
    for i, (hist, title, best) in enumerate(cases):
        curves_png(str(tmp_path / f"r{i}.png"), hist, title, best)
        _fresh(str(tmp_path / f"f{i}.png"), hist, title, best)
        got, want = _pixels(tmp_path / f"r{i}.png"), _pixels(tmp_path / f"f{i}.png")
        assert got.shape == want.shape and (got == want).all(), f"case {i} ({title}) differs from a fresh figure"


def test_threads_drawing_at_once_each_get_their_own_curves(tmp_path):
    hists = [_history(5 + 3 * k, 1.0 + k) for k in range(4)]
    threads = [threading.Thread(target=curves_png, args=(str(tmp_path / f"t{k}.png"), h, f"t{k}"))
               for k, h in enumerate(hists)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, h in enumerate(hists):
        _fresh(str(tmp_path / f"f{k}.png"), h, f"t{k}")
        assert (_pixels(tmp_path / f"t{k}.png") == _pixels(tmp_path / f"f{k}.png")).all()
