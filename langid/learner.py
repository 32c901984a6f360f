"""The fastai side of training: the Learner, a stage's freezing and learning rates, SpecAugment, lr_find."""
from __future__ import annotations

import os
import shutil
import tempfile

import torch
import torch.nn as nn
from fastai.callback.core import Callback

from langid.config import Stage
from langid.model import layer_groups


class SpecAugment(Callback):
    """SpecAugment-style masking and a random time shift on training batches."""

    order = 5

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)

    def before_batch(self):
        if not self.training:
            return
        x = self.xb[0].clone()
        b, _, n_mels, frames = x.shape
        shift = int(torch.randint(0, frames, (1,), generator=self.gen))
        x = torch.roll(x, shifts=shift, dims=3)
        for _ in range(2):
            f0 = int(torch.randint(0, max(1, n_mels - n_mels // 8), (1,), generator=self.gen))
            t0 = int(torch.randint(0, max(1, frames - frames // 10), (1,), generator=self.gen))
            x[:, :, f0:f0 + n_mels // 8, :] = 0
            x[:, :, :, t0:t0 + frames // 10] = 0
        self.learn.xb = (x,)


def make_learner(model: nn.Module, dls, path: str, cbs=(), mixed_precision: bool = False):
    """A fastai Learner with the model's three layer groups, Adam and cross-entropy; no progress bars."""
    import fastai.callback.schedule  # noqa: F401  (patches fit_one_cycle and lr_find onto Learner)
    from fastai.callback.progress import ProgressCallback
    from fastai.learner import Learner
    from fastai.optimizer import Adam

    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=Adam, splitter=layer_groups,
                    path=path, cbs=list(cbs))
    for cb in [cb for cb in learn.cbs if isinstance(cb, ProgressCallback)]:
        learn.remove_cb(cb)  # workers print one line per epoch instead of redrawing bars through Ray's log
    learn.logger = lambda *_: None
    if mixed_precision:
        learn.to_fp16()
    return learn


def apply_stage(learn, stage: Stage) -> list[float]:
    """Freeze or unfreeze for a stage and set its per-group learning rates; returns them."""
    if stage.freeze:
        learn.freeze()
    else:
        learn.unfreeze()
    lrs = stage.lrs()
    learn.opt.set_hyper("lr", lrs)
    return lrs


def lr_find(model: nn.Module, dls, plot: str) -> float:
    """fastai's learning-rate finder on the head-only stage; writes its plot, returns the valley suggestion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = tempfile.mkdtemp(prefix="langid-lrfind-")
    try:
        learn = make_learner(model, dls, workdir)
        learn.freeze()
        suggestion = learn.lr_find(show_plot=False)
        learn.recorder.plot_lr_find()
        os.makedirs(os.path.dirname(plot) or ".", exist_ok=True)
        plt.savefig(plot, dpi=100)
        plt.close("all")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return float(suggestion.valley)
