"""The network: a torchvision ResNet on one-channel log-mel input with fastai's head, or a small mlp on a
front-end's embeddings; its starting weights. The folder it is saved in is `langid.artifact`'s."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from langid.config import ARCHITECTURES
from langid.errors import BadValue

# log-mel images live in [0, 1]; ImageNet's grey-level statistics put them where pretrained filters expect
INPUT_MEAN, INPUT_STD = 0.449, 0.226


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


def initial_weights(arch: str, pretrained: bool = True, weights_file: Optional[str] = None,
                    download: bool = True) -> tuple[Optional[dict], str]:
    """The body's starting weights and a line saying where they came from: ImageNet's from a given file,
    torchvision's cache or a download (None, so random, when offline, not asked for, or for the mlp)."""
    if arch == "mlp":
        return None, "mlp on the store's front-end embeddings: no ImageNet weights"
    if not pretrained:
        return None, "random initialisation (--no-pretrained)"
    import torchvision

    from langid.artifact import ModelError, read_state_dict

    enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    if weights_file:
        if not os.path.exists(weights_file):
            raise ModelError(f"{weights_file}: weights file not found")
        return read_state_dict(weights_file), f"ImageNet weights from {weights_file}"
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))
    if os.path.exists(cached):
        return read_state_dict(cached), f"ImageNet weights from torchvision's cache ({cached})"
    if download:
        import contextlib
        import io

        try:
            with contextlib.redirect_stdout(io.StringIO()):  # torch.hub's "Downloading: <url>" line; ours says it
                return enum.get_state_dict(progress=False, weights_only=True), "ImageNet weights downloaded"
        except Exception as e:  # offline is a normal condition here, not a crash
            return None, f"no ImageNet weights ({type(e).__name__}: offline?); training from random initialisation"
    return None, "no ImageNet weights cached; training from random initialisation"


def build_model(arch: str, n_classes: int, pretrained: bool = True, weights_file: Optional[str] = None,
                log=print, input_shape: Optional[tuple] = None) -> LangIdNet:
    """A LangIdNet with its `initial_weights` (`log` gets the line saying which)."""
    state, message = initial_weights(arch, pretrained, weights_file)
    log(message)
    return LangIdNet(arch, n_classes, resnet_state=state, input_shape=input_shape)


def default_device(gpu: Optional[bool] = None) -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if gpu is None:
        gpu = torch.cuda.is_available()
    if gpu and not torch.cuda.is_available():
        raise BadValue("--gpu asked for, but CUDA is not available here")
    return torch.device("cuda" if gpu else "cpu")
