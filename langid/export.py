"""The model folder a training run leaves: weights per stage, calibration, history, curves."""
from __future__ import annotations

import csv
import os
from dataclasses import asdict

import numpy as np
import torch

from langid.config import FeatureConfig, TrainConfig
from langid.artifact import save_model
from langid.model import LangIdNet
from langid.onnxmodel import export_folder
from langid.trainset import VALID, iter_split
from langid.uris import atomic_output


def calibrate(model: LangIdNet, store: str, labels: list[str], cfg: FeatureConfig, batch_size: int = 64) -> dict:
    """Temperature scaling fitted on the validation windows (streamed), so reported confidences mean what they say."""
    from langid.inference import LanguageIdentifier
    from langid.metrics import fit_temperature, nll

    # log-probabilities at temperature 1 are the logits less a constant per window: softmax(. / T) is the same
    ident = LanguageIdentifier(model.eval(), {"labels": labels, "feature_config": cfg}, torch.device("cpu"))
    pairs = [(ident.logprobs(x, batch_size), y) for x, y in iter_split(store, VALID, labels, batch_size)]
    logprobs, y = (np.concatenate(part) for part in zip(*pairs))
    t = fit_temperature(logprobs, y)
    return {"temperature": t, "valid_nll_uncalibrated": nll(logprobs, y), "valid_nll_calibrated": nll(logprobs, y, t),
            "windows": len(y)}


def export_model(output: str, tc: TrainConfig, cfg: FeatureConfig, labels: list[str], progress: dict,
                 best: dict, pretrained: bool, seconds: float) -> dict:
    """Model folder: the last stage's best weights as the model (also as model.onnx, for ONNX Runtime), each stage's
    best under stages/ (exported to ONNX on first use, if ever), history, curves."""
    from langid.plots import training_curves_png

    last = [s.name for s in tc.stages if s.epochs > 0][-1]
    meta = {
        "schedule": [asdict(s) for s in tc.stages],
        "training": {"batch_size": tc.batch_size, "workers": tc.workers, "gpu": tc.gpu, "seed": tc.seed,
                     "mixed_precision": tc.mixed_precision, "spec_augment": tc.spec_augment,
                     "imagenet_pretrained": pretrained, "seconds": round(seconds, 1), "store": tc.store},
        "best_per_stage": progress["best"],
        "metrics": {"valid": progress["best"][last]},
    }
    for stage_name, weights in best.items():
        model = LangIdNet(tc.arch, len(labels), input_shape=cfg.shape)
        model.load_state_dict(weights)
        folder = os.path.join(output, "stages", stage_name)
        save_model(model, folder, labels, cfg, {**meta, "metrics": {"valid": progress["best"][stage_name]}})
    model = LangIdNet(tc.arch, len(labels), input_shape=cfg.shape)
    model.load_state_dict(best[last])
    meta["calibration"] = calibrate(model, tc.store, labels, cfg)
    save_model(model, output, labels, cfg, meta)
    export_folder(model, output, cfg.shape)
    history = progress["history"]
    with atomic_output(os.path.join(output, "history.csv")) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    training_curves_png(history, os.path.join(output, "training_curves.png"))
    return {"output": output, "labels": labels, "history": history, "best": progress["best"]}
