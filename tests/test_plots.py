"""The figures show what their data say: found in the PNG by the colours the plots draw with."""
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from langid import plots


def _check_png(path, min_side=200):
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert min(img.size) >= min_side
        pixels = np.asarray(img.convert("L"))
    assert len(np.unique(pixels)) > 10  # a drawn figure, not a blank canvas


def _rgb(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).astype(int)


def _painted(rgb: np.ndarray, colour) -> np.ndarray:
    """Where `colour` (RGB(A) in [0, 1]) is painted, give or take rounding."""
    return np.abs(rgb - np.round(np.asarray(colour[:3]) * 255)).max(axis=2) <= 2


def _areas(path, colour, count: int, corners: bool = False) -> list[np.ndarray]:
    """The `count` largest connected areas painted in `colour`, as masks, the largest first; with `corners`, pixels
    touching at a corner connect (a thin sloping line's do; the diagonal cells of a matrix must not)."""
    mask = _painted(_rgb(path), colour)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)) if corners else None)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return [labels == 1 + i for i in np.argsort(-sizes)[:count]]


def _box(area: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a mask, bottom and right exclusive."""
    rows, cols = np.nonzero(area)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def _extremes(path, colour, n_points: int) -> tuple[int, int]:
    """(point at the top, point at the bottom), 1-based, of the curve drawn in `colour` through `n_points` evenly
    spaced points: its largest area, whose ends are the first and the last point."""
    rows, cols = np.nonzero(_areas(path, colour, 1, corners=True)[0])
    left, right = cols.min(), cols.max()

    def point(x):
        return 1 + round((x - left) / (right - left) * (n_points - 1))

    return point(cols[rows == rows.min()].mean()), point(cols[rows == rows.max()].mean())


def test_confusion_matrix_png(tmp_path):
    cm = np.arange(400).reshape(20, 20) % 7
    out = plots.confusion_matrix_png(cm, [f"lang{i}" for i in range(20)], tmp_path / "sub" / "cm.png")
    _check_png(out, min_side=600)
    _check_png(plots.confusion_matrix_png([[3, 1], [0, 0]], ["en", "fr"], tmp_path / "cm2.png", normalize=False))


def test_a_perfect_confusion_matrix_is_dark_on_its_diagonal_only(tmp_path):
    blues = matplotlib.colormaps["Blues"]
    out = plots.confusion_matrix_png(np.diag([5, 3, 2]), ["aa", "bb", "cc"], tmp_path / "cm.png")
    cells = sorted((_box(a) for a in _areas(out, blues(1.0), 3)), key=lambda box: box[2])  # the colour bar's
    for (top, bottom, left, right), (top2, _, left2, _) in zip(cells, cells[1:]):        # darkest end is smaller
        assert abs(top2 - bottom) <= 2 and abs(left2 - right) <= 2  # the next cell down and to the right
        assert abs((bottom - top) - (right - left)) <= 2  # square
    rgb = _rgb(out)
    for i, row in enumerate(cells):
        for j, column in enumerate(cells):
            if i != j:  # an empty cell carries no text: its centre shows its colour
                centre = rgb[(row[0] + row[1]) // 2, (column[2] + column[3]) // 2]
                assert _painted(centre[None, None], blues(0.0)).all(), (i, j, centre)


def test_training_curves_png(tmp_path):
    history = [
        {"epoch": 1, "stage": "head", "train_loss": 1.2, "valid_loss": 1.1, "accuracy": 0.4, "lr": 1e-3},
        {"epoch": 2, "stage": "head", "train_loss": 0.9, "valid_loss": float("nan"), "accuracy": 0.5, "lr": 1e-3},
        {"epoch": 1, "stage": "full", "train_loss": 0.7, "lr": 1e-4},
        {"epoch": 2, "stage": "full", "train_loss": 0.6, "valid_loss": 0.8, "accuracy": 0.7, "lr": 5e-5},
    ]
    _check_png(plots.training_curves_png(history, tmp_path / "curves.png"))
    # only train loss, no lr at all
    _check_png(plots.training_curves_png([{"train_loss": 1.0}, {"train_loss": 0.5}], tmp_path / "c2.png"))


def test_training_curves_peak_and_dip_at_the_datas_epochs(tmp_path):
    loss, lr = [1.0, 2.0, 0.5, 1.5, 0.8], [1e-3, 1e-4, 5e-3, 2e-3, 1e-2]
    out = plots.training_curves_png([{"train_loss": a, "lr": b} for a, b in zip(loss, lr)], tmp_path / "curves.png")
    assert _extremes(out, matplotlib.colors.to_rgb("tab:blue"), len(loss)) == (2, 3)  # the loss (first line drawn)
    assert _extremes(out, matplotlib.colors.to_rgb("tab:red"), len(lr)) == (5, 2)  # the lr, on a log scale


def test_spectrogram_png_puts_low_bins_at_the_bottom_and_time_left_to_right(tmp_path):
    spec = np.zeros((64, 300))
    spec[:8, 150:] = 1.0  # loud in the 8 lowest bins, in the second half
    out = plots.spectrogram_png(spec, tmp_path / "spec.png", title="example")
    _check_png(out)
    magma = matplotlib.colormaps["magma"]
    top, bottom, left, right = _box(_areas(out, magma(0.0), 1)[0])  # the quiet part spans the whole picture
    loud = _box(_areas(out, magma(1.0), 1)[0])
    assert loud == pytest.approx((bottom - (bottom - top) * 8 / 64, bottom, (left + right) / 2, right), abs=2)


def test_plots_import_does_not_load_pyplot():
    code = "import sys, langid.plots; print('matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
