"""Evaluation and training figures written as PNG files (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from langid.config import FeatureConfig


def _pyplot():
    # Selected here rather than at import so importing this module stays cheap and headless jobs never need a display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def confusion_matrix_png(matrix, labels, path, title: str = "Confusion matrix", normalize: bool = True) -> Path:
    """Confusion matrix (rows true, cols predicted), each cell annotated with its count and row percentage."""
    plt = _pyplot()
    cm = np.asarray(matrix, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    shown = frac if normalize else cm
    n = len(labels)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(cm.max(), 1))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="row fraction" if normalize else "count")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    font = 9 if n <= 10 else 7
    high = 0.5 * (im.norm.vmax + im.norm.vmin)
    for i in range(n):
        for j in range(n):
            if cm[i, j] == 0 and i != j:
                continue  # empty off-diagonal cells stay blank to keep large matrices legible
            colour = "white" if shown[i, j] > high else "black"
            ax.text(j, i, f"{int(cm[i, j])}\n{100 * frac[i, j]:.0f}%", ha="center", va="center",
                    fontsize=font, color=colour)
    return _save(fig, path)


def training_curves_png(history: list[dict], path) -> Path:
    """Losses and accuracy per global epoch (one history entry each, in order) with stage boundaries; lr below."""
    plt = _pyplot()

    def series(key):
        vals = [h.get(key) for h in history]
        return np.array([np.nan if v is None else float(v) for v in vals])

    x = np.arange(1, len(history) + 1)
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key, style in (("train_loss", "-"), ("valid_loss", "--")):
        y = series(key)
        if np.isfinite(y).any():
            ax.plot(x, y, style, marker=".", label=key)
    ax.set_ylabel("loss")
    acc = series("accuracy")
    handles, names = ax.get_legend_handles_labels()
    if np.isfinite(acc).any():
        ax_acc = ax.twinx()
        (line,) = ax_acc.plot(x, acc, ":", color="tab:green", marker=".", label="accuracy")
        ax_acc.set_ylabel("accuracy")
        handles, names = handles + [line], names + ["accuracy"]
    if handles:
        ax.legend(handles, names, loc="best")

    stages = [h.get("stage") for h in history]
    for i, stage in enumerate(stages):
        if i == 0 or stage != stages[i - 1]:
            if i > 0:
                for a in (ax, ax_lr):
                    a.axvline(x[i] - 0.5, color="grey", linewidth=0.8, linestyle="--")
            if stage is not None:
                ax.text(x[i] - 0.4, 1.0, str(stage), transform=ax.get_xaxis_transform(), va="bottom", fontsize=8)

    lr = series("lr")
    if (lr > 0).any():  # NaN compares False, so this also covers "no lr logged"
        ax_lr.plot(x, lr, marker=".", color="tab:red")
        ax_lr.set_yscale("log")
    ax_lr.set(xlabel="epoch", ylabel="lr")
    return _save(fig, path)


def spectrogram_png(spec, path, sample_rate: int = FeatureConfig.sample_rate, hop_length: int = FeatureConfig.hop_length,
                    title: str | None = None) -> Path:
    """(n_mels, frames) spectrogram in [0, 1] with time in seconds, mel bins and a colour bar."""
    plt = _pyplot()
    spec = np.asarray(spec)
    n_mels, frames = spec.shape
    fig, ax = plt.subplots(figsize=(8, 3))
    im = ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", vmin=0, vmax=1,
                   extent=(0, frames * hop_length / sample_rate, 0, n_mels))
    fig.colorbar(im, ax=ax)
    ax.set(xlabel="time (s)", ylabel="mel bin")
    if title:
        ax.set_title(title)
    return _save(fig, path)
