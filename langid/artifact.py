"""A model folder: `model.safetensors` (weights), `model.json` (labels, feature configuration, architecture,
schedule, metrics, calibration) and `model.onnx` (langid.onnxmodel); written atomically, checked before use, and
never unpickled. Reading and checking the metadata needs no torch."""
from __future__ import annotations

import json
import os
from typing import Optional

from langid.config import ARCHITECTURES, FeatureConfig
from langid.errors import UserError, one_line

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT_VERSION = 1
MAX_LABELS = 10_000

class ModelError(UserError):
    """A model folder that cannot be loaded (missing, unsafe or inconsistent); one-line reason."""


def read_state_dict(path: str) -> dict:
    """A state dict from a safetensors file, or from a torch file without unpickling (`weights_only`)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def save_model(model, folder: str, labels: list[str], cfg: FeatureConfig, extra: Optional[dict] = None) -> None:
    """Write weights (safetensors) and metadata (JSON) atomically into `folder` (a path or URI)."""
    from safetensors.torch import save_file

    from langid.uris import StagedFolder, atomic_output, is_uri

    if is_uri(folder):
        with StagedFolder(folder) as local:
            return save_model(model, local, labels, cfg, extra)
    model = getattr(model, "module", model)
    os.makedirs(folder, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "architecture": model.arch, "labels": list(labels),
            "feature_config": cfg.to_dict(), **(extra or {})}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(os.path.join(folder, WEIGHTS_FILE)) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    with atomic_output(os.path.join(folder, META_FILE)) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=2, default=float)


def read_metadata(folder: str) -> dict:
    """model.json, validated before anything uses it."""
    from langid.uris import local_folder

    try:
        folder = local_folder(folder)  # a model at a URI is read from a local copy
    except (FileNotFoundError, OSError) as e:
        raise ModelError(f"{folder}: model folder not readable ({one_line(e)})") from None
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


def weights_file(folder: str) -> str:
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
    weights = weights_file(local_folder(folder))
    try:
        with safe_open(weights, "numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{weights}: weights do not fit the metadata ({one_line(e)})") from None
    import torch

    from langid.model import LangIdNet

    with torch.device("meta"):  # shapes without memory
        model = LangIdNet(meta["architecture"], len(meta["labels"]), input_shape=meta["feature_config"].shape)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = sorted(set(shapes.items()) ^ set(expected.items()))
    if wrong:
        raise ModelError(f"{weights}: weights do not fit the metadata (for {meta['architecture']} with "
                         f"{len(meta['labels'])} labels: {wrong[0][0]} {wrong[0][1]})")
    return meta


def load_network(folder: str, device="cpu"):
    """(LangIdNet in eval mode, metadata) from a model folder (path or URI); refuses any pickle. For predictions,
    `langid.load_model` (which runs it with ONNX Runtime or torch)."""
    from langid.model import LangIdNet
    from langid.uris import local_folder

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = inspect_model(folder)  # weights of another shape are named as such, before anything is loaded
    weights = weights_file(local_folder(folder))

    model = LangIdNet(meta["architecture"], len(meta["labels"]), input_shape=meta["feature_config"].shape)
    try:
        state = load_file(weights)
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ModelError(f"{weights}: weights do not fit the metadata ({one_line(e)})") from None
    return model.to(device).eval(), meta
