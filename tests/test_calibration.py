"""Temperature scaling at export (langid/export.py: calibrate) on a store's validation windows."""
import numpy as np
import pytest
import torch

from langid.config import FeatureConfig
from langid.export import calibrate
from langid.metrics import fit_temperature, nll
from langid.model import LangIdNet
from langid.trainset import VALID, iter_split
from support.generated_store import LANGUAGES, write_store

CFG = FeatureConfig(window_seconds=1.0, n_mels=32, hop_length=160)


def test_calibration_fits_the_models_logits_on_the_validation_windows(tmp_path):
    store, labels = str(tmp_path / "store"), list(LANGUAGES)
    write_store(store, train=20, valid=45, cfg=CFG, shard_windows=16)
    torch.manual_seed(0)
    model = LangIdNet("resnet18", len(labels)).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(30)  # confident on windows that tell no language: a temperature above 1
        x, y = map(np.concatenate, zip(*iter_split(store, VALID, labels)))
        logits = model(torch.from_numpy(x)[:, None]).numpy()

    got = calibrate(model, store, labels, CFG, batch_size=16)
    assert got["windows"] == len(y) == 45
    assert got["temperature"] == pytest.approx(fit_temperature(logits, y), rel=1e-3) and got["temperature"] > 1
    assert got["valid_nll_uncalibrated"] == pytest.approx(nll(logits, y), rel=1e-5)
    assert got["valid_nll_calibrated"] == pytest.approx(nll(logits, y, got["temperature"]), rel=1e-5)
    assert got["valid_nll_calibrated"] < got["valid_nll_uncalibrated"]
