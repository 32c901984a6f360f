"""The network and the model artifact: a torchvision ResNet on one-channel log-mel input.

A model folder holds `model.safetensors` (weights) and `model.json` (labels, feature configuration,
architecture, schedule, metrics). Loading never unpickles anything.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from langid.config import ARCHITECTURES, FeatureConfig
from langid.errors import BadValue, UserError

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT_VERSION = 1
MAX_LABELS = 10_000
# log-mel images live in [0, 1]; ImageNet's grey-level statistics put them where pretrained filters expect
INPUT_MEAN, INPUT_STD = 0.449, 0.226


class ModelError(UserError):
    """A model folder that cannot be loaded (missing, unsafe or inconsistent); one-line reason."""


class AdaptiveConcatPool2d(nn.Module):
    """Average and max pooling side by side, as fastai's head uses."""

    def forward(self, x):
        return torch.cat([nn.functional.adaptive_max_pool2d(x, 1), nn.functional.adaptive_avg_pool2d(x, 1)], 1)


def make_head(n_features: int, n_classes: int, hidden: int = 512) -> nn.Sequential:
    """fastai's `create_head` in plain torch, so prediction needs no fastai."""
    return nn.Sequential(
        AdaptiveConcatPool2d(), nn.Flatten(),
        nn.BatchNorm1d(2 * n_features), nn.Dropout(0.25), nn.Linear(2 * n_features, hidden, bias=False), nn.ReLU(inplace=True),
        nn.BatchNorm1d(hidden), nn.Dropout(0.5), nn.Linear(hidden, n_classes, bias=False),
    )


class LangIdNet(nn.Module):
    """ResNet body (conv1 taking one channel) + fastai-style head; input (batch, 1, n_mels, frames) in [0, 1].
    The `mlp` architecture is a small network on a frozen front-end's pooled embedding (input (batch, 1, *shape))."""

    def __init__(self, arch: str, n_classes: int, resnet_state: Optional[dict] = None,
                 input_shape: Optional[tuple] = None):
        super().__init__()
        import torchvision

        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        self.arch, self.n_classes = arch, n_classes
        if arch == "mlp":
            if input_shape is None:
                raise ValueError("the mlp architecture needs its input shape (the store's feature configuration)")
            self._mlp(int(np.prod(input_shape)), n_classes)
            return
        resnet = getattr(torchvision.models, arch)()
        if resnet_state is not None:
            resnet.load_state_dict(resnet_state)
        conv = resnet.conv1
        conv1 = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
        with torch.no_grad():  # a grey image through RGB filters is the sum of their channel weights
            conv1.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        n_features = resnet.fc.in_features
        self.body = nn.Sequential(conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                  resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        self.head = make_head(n_features, n_classes)
        self.split_at = 6  # fastai's ResNet split: stem to layer2, then layer3-4

    def _mlp(self, n_in: int, n_classes: int, hidden: int = 128) -> None:
        # the input's BatchNorm standardises the embedding, as a scaler fitted on the training set would; small and
        # heavily dropped out, since a few hundred clips are what it learns from (measured in benchmarks/realspeech.py)
        self.body = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(n_in), nn.Dropout(0.5), nn.Linear(n_in, hidden),
                                  nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(hidden, n_classes))
        self.split_at = 2  # input normalisation | hidden layer | head

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if self.arch == "mlp":
            return self.head(self.body(x))
        return self.head(self.body((x - INPUT_MEAN) / INPUT_STD))


def layer_groups(model: LangIdNet) -> list[list[nn.Parameter]]:
    """Three groups for discriminative learning rates: early body, late body, head (fastai's ResNet split)."""
    model = getattr(model, "module", model)  # through DistributedDataParallel
    k = model.split_at
    return [list(model.body[:k].parameters()), list(model.body[k:].parameters()), list(model.head.parameters())]


def imagenet_weights(arch: str, weights_file: Optional[str] = None, download: bool = True):
    """ImageNet weights from a given file, torchvision's cache, or a download; (state_dict or None, message)."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    if weights_file:
        if not os.path.exists(weights_file):
            raise ModelError(f"{weights_file}: weights file not found")
        return _read_state_dict(weights_file), f"ImageNet weights from {weights_file}"
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))
    if os.path.exists(cached):
        return _read_state_dict(cached), f"ImageNet weights from torchvision's cache ({cached})"
    if download:
        try:
            return enum.get_state_dict(progress=False, weights_only=True), "ImageNet weights downloaded"
        except Exception as e:  # offline is a normal condition here, not a crash
            return None, f"no ImageNet weights ({type(e).__name__}: offline?); training from random initialisation"
    return None, "no ImageNet weights cached; training from random initialisation"


def _read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def build_model(arch: str, n_classes: int, pretrained: bool = True, weights_file: Optional[str] = None,
                log=print, input_shape: Optional[tuple] = None) -> LangIdNet:
    """A LangIdNet, with ImageNet weights in its body when they can be had (the message says which)."""
    state = None
    if arch == "mlp":
        log("mlp on the store's front-end embeddings: no ImageNet weights")
    elif pretrained:
        state, message = imagenet_weights(arch, weights_file)
        log(message)
    else:
        log("random initialisation (pretrained weights not asked for)")
    return LangIdNet(arch, n_classes, resnet_state=state, input_shape=input_shape)


def save_model(model: LangIdNet, folder: str, labels: list[str], cfg: FeatureConfig, extra: Optional[dict] = None) -> None:
    """Write weights (safetensors) and metadata (JSON) atomically into `folder` (a path or URI)."""
    from safetensors.torch import save_file

    from langid.uris import StagedFolder, is_uri

    if is_uri(folder):
        with StagedFolder(folder) as local:
            return save_model(model, local, labels, cfg, extra)
    model = getattr(model, "module", model)
    os.makedirs(folder, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "architecture": model.arch, "labels": list(labels),
            "feature_config": cfg.to_dict(), **(extra or {})}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp_w, tmp_m = os.path.join(folder, f".{WEIGHTS_FILE}.tmp"), os.path.join(folder, f".{META_FILE}.tmp")
    save_file(state, tmp_w, metadata={"format": "pt"})
    with open(tmp_m, "w") as f:
        json.dump(meta, f, indent=2, default=float)
    os.replace(tmp_w, os.path.join(folder, WEIGHTS_FILE))
    os.replace(tmp_m, os.path.join(folder, META_FILE))


def read_metadata(folder: str) -> dict:
    """model.json, validated before anything uses it."""
    from langid.uris import local_folder

    try:
        folder = local_folder(folder)  # a model at a URI is read from a local copy
    except (FileNotFoundError, OSError) as e:
        raise ModelError(f"{folder}: model folder not readable ({' '.join(str(e).split())[:200]})") from None
    path = os.path.join(folder, META_FILE)
    if not os.path.isdir(folder):
        raise ModelError(f"{folder}: model folder not found (train one with jobs/train.py)")
    if not os.path.exists(path):
        raise ModelError(f"{folder}: no {META_FILE}; not a langid model folder")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable metadata ({e})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: metadata must be a JSON object")
    labels = meta.get("labels")
    if not (isinstance(labels, list) and 0 < len(labels) <= MAX_LABELS and all(isinstance(x, str) and x for x in labels)
            and len(set(labels)) == len(labels)):  # the cap: the head is built for them before the weights are read
        raise ModelError(f"{path}: 'labels' must be a non-empty list of distinct strings (at most {MAX_LABELS})")
    if meta.get("architecture") not in ARCHITECTURES:
        raise ModelError(f"{path}: unknown architecture {meta.get('architecture')!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}")
    try:
        meta["feature_config"] = FeatureConfig.from_dict(meta.get("feature_config"), complete=True)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{path}: bad feature_config ({e})") from None
    calibration = meta.get("calibration", {})
    temperature = calibration.get("temperature", 1.0) if isinstance(calibration, dict) else None
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and 0 < temperature < float("inf")):
        raise ModelError(f"{path}: 'calibration' must be an object whose temperature is a positive number")
    return meta


PICKLE_SUFFIXES = (".pkl", ".pickle", ".pth", ".pt", ".bin", ".ckpt")


def _weights_file(folder: str) -> str:
    """The safetensors weights of a model folder; a folder holding a pickle is refused (it is never opened):
    a model folder is written by langid, so a pickle in it was put there by someone else, on purpose or not."""
    unsafe = sorted(f for f in os.listdir(folder) if f.lower().endswith(PICKLE_SUFFIXES))
    weights = os.path.join(folder, WEIGHTS_FILE)
    if unsafe:
        missing = "" if os.path.exists(weights) else f"no {WEIGHTS_FILE}, and "
        raise ModelError(f"{folder}: {missing}it holds {', '.join(unsafe)}: pickled files are never loaded; "
                         f"remove them (weights load only from {WEIGHTS_FILE})")
    if not os.path.exists(weights):
        raise ModelError(f"{folder}: no {WEIGHTS_FILE}")
    return weights


def inspect_model(folder: str) -> dict:
    """Metadata of a model folder whose weights are checked to fit it from their header alone (nothing loaded,
    no pickle opened): a job finds a broken folder before it starts, not when its workers die loading it."""
    from safetensors import SafetensorError, safe_open

    from langid.uris import local_folder

    meta = read_metadata(folder)
    weights = _weights_file(local_folder(folder))
    try:
        with safe_open(weights, "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{weights}: weights do not fit the metadata ({' '.join(str(e).split())[:200]})") from None
    with torch.device("meta"):  # shapes without memory
        model = LangIdNet(meta["architecture"], len(meta["labels"]), input_shape=meta["feature_config"].shape)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = sorted(set(shapes.items()) ^ set(expected.items()))
    if wrong:
        raise ModelError(f"{weights}: weights do not fit the metadata (for {meta['architecture']} with "
                         f"{len(meta['labels'])} labels: {wrong[0][0]} {wrong[0][1]})")
    return meta


def load_model(folder: str, device: str | torch.device = "cpu") -> tuple[LangIdNet, dict]:
    """(model in eval mode, metadata) from a model folder (path or URI); refuses any pickle."""
    from langid.uris import local_folder

    meta = read_metadata(folder)
    weights = _weights_file(local_folder(folder))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model = LangIdNet(meta["architecture"], len(meta["labels"]), input_shape=meta["feature_config"].shape)
    try:
        state = load_file(weights)
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ModelError(f"{weights}: weights do not fit the metadata ({' '.join(str(e).split())[:200]})") from None
    return model.to(device).eval(), meta


def default_device(gpu: Optional[bool] = None) -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if gpu is None:
        gpu = torch.cuda.is_available()
    if gpu and not torch.cuda.is_available():
        raise BadValue("--gpu asked for, but CUDA is not available here")
    return torch.device("cuda" if gpu else "cpu")
