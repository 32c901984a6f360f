"""The training checkpoint format: a folder Ray Train stores every epoch, read back without unpickling.

    model.safetensors           current weights
    optimizer.pt                optimizer state as plain tensors, lists and dicts (torch.load weights_only)
    best-<stage>.safetensors    each stage's best weights so far
    state.json                  progress: stage, epoch, history rows, best metrics per stage
"""
from __future__ import annotations

import io
import json
import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

MODEL, OPTIMIZER, STATE = "model.safetensors", "optimizer.pt", "state.json"
BEST_PREFIX, BEST_SUFFIX = "best-", ".safetensors"


def _plain(obj):
    """fastai's optimizer state with its fastcore containers turned into lists and dicts (weights_only-loadable)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "L":
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_checkpoint(folder: str, model: nn.Module, opt_state: dict, state: dict, best: dict) -> None:
    """Current weights, optimizer state, progress, and each stage's best weights into `folder`."""
    from safetensors.torch import save_file

    raw = getattr(model, "module", model)
    save_file({k: v.detach().cpu().contiguous() for k, v in raw.state_dict().items()}, os.path.join(folder, MODEL))
    buf = io.BytesIO()
    torch.save(_plain(opt_state), buf)
    with open(os.path.join(folder, OPTIMIZER), "wb") as f:
        f.write(buf.getvalue())
    for stage_name, weights in best.items():
        save_file(weights, os.path.join(folder, f"{BEST_PREFIX}{stage_name}{BEST_SUFFIX}"))
    with open(os.path.join(folder, STATE), "w") as f:
        json.dump(state, f, indent=2)


def load_checkpoint(folder: str) -> tuple[dict, Optional[dict], dict, dict]:
    """(weights, optimizer state or None, progress state, best weights per stage) from a checkpoint folder."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, STATE)) as f:
        state = json.load(f)
    weights = load_file(os.path.join(folder, MODEL))
    opt_path = os.path.join(folder, OPTIMIZER)
    opt_state = torch.load(opt_path, map_location="cpu", weights_only=True) if os.path.exists(opt_path) else None
    best = {name[len(BEST_PREFIX):-len(BEST_SUFFIX)]: load_file(os.path.join(folder, name))
            for name in os.listdir(folder) if name.startswith(BEST_PREFIX) and name.endswith(BEST_SUFFIX)}
    return weights, opt_state, state, best
