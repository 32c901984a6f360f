"""A trained model's ONNX form, run by ONNX Runtime: faster than eager torch on CPU (benchmarks/onnx_speed.py).

`model.onnx` lies beside `model.safetensors` and carries the SHA-256 of the weights it was exported from, so a
stale one (weights replaced) is found and exported again. A folder that cannot be written (read-only, or a URI)
gets its export in the cache, keyed by that SHA-256. The graph gives logits; temperature and softmax stay in
Python with the metadata, as in the torch path.
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
import threading
import warnings

import numpy as np

from langid.uris import filesystem, write_atomic

ONNX_FILE = "model.onnx"
SHA_KEY = "langid.weights_sha256"
ARCH_KEY = "langid.architecture"  # with the hash and the graph's shapes: the metadata the graph was made for
INPUT, OUTPUT = "specs", "logits"
OPSET = 17
ORT_ERROR = 3  # ONNX Runtime's log severity: errors only, no warnings printed to the user
_export_lock = threading.Lock()  # the TorchScript exporter keeps global state


def weights_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def export_onnx(model, input_shape: tuple, sha256: str) -> bytes:
    """The model's logits graph for (batch, *input_shape) float32 input, batch dynamic: exported from a CPU, float32,
    eval-mode copy (the caller's model is left as it was), `sha256` and the architecture recorded in its metadata."""
    import onnx
    import torch

    model = copy.deepcopy(getattr(model, "module", model)).cpu().float().eval()
    buf = io.BytesIO()
    with _export_lock, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes say nothing to a user
        torch.onnx.export(model, (torch.zeros(2, *input_shape),), buf, dynamo=False, opset_version=OPSET,
                          do_constant_folding=True, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    proto = onnx.load_model_from_string(buf.getvalue())
    onnx.helper.set_model_props(proto, {SHA_KEY: sha256, ARCH_KEY: model.arch})
    return proto.SerializeToString()


def export_folder(model, folder: str, input_shape: tuple) -> str:
    """model.onnx beside the model.safetensors that `save_model` just wrote for `model` in `folder`."""
    from langid.artifact import WEIGHTS_FILE

    path = os.path.join(folder, ONNX_FILE)
    write_atomic(*filesystem(path), export_onnx(model, input_shape, weights_sha256(os.path.join(folder, WEIGHTS_FILE))))
    return path


def cache_path(sha256: str) -> str:
    from langid.whisper import cache_dir

    return os.path.join(cache_dir(), "onnx", f"{sha256}.onnx")


def session_options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(0, threads)  # 0: ONNX Runtime's default (one per physical core)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = ORT_ERROR
    # idle threads sleep instead of spinning: a label actor's threads share their cores with decoding tasks
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def providers(device) -> list:
    """CUDA first on a CUDA device when this ONNX Runtime has it; CPU always."""
    name = str(device)  # "cuda", "cuda:1", or a torch.device, which prints the same
    if name.startswith("cuda") and cuda_available():
        return [("CUDAExecutionProvider", {"device_id": int(name.partition(":")[2] or 0)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(data: bytes, threads: int, device):
    import onnxruntime as ort

    ort.set_default_logger_severity(ORT_ERROR)
    return ort.InferenceSession(data, session_options(threads), providers=providers(device))


def _current(path: str, sha256: str, meta: dict, threads: int, device):
    """A session of the ONNX file at `path` when it was exported from these weights for this metadata's
    architecture, input and labels; None when absent, stale or unreadable (an interrupted copy: exported again)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        session = _session(data, threads, device)
    except Exception:  # OSError, or ONNX Runtime's own errors for a file that is not a model
        return None
    fits = (session.get_inputs()[0].shape[1:] == list(meta["feature_config"].shape)
            and session.get_outputs()[0].shape[1:] == [len(meta["labels"])])
    made_for = session.get_modelmeta().custom_metadata_map
    current = made_for.get(SHA_KEY) == sha256 and made_for.get(ARCH_KEY) == meta["architecture"]
    return session if fits and current else None


def onnx_session(folder: str, device=None, threads: int = 0) -> tuple[object, dict, str]:
    """(ONNX Runtime session, metadata, the file it came from or '' when it could be kept nowhere) for a model
    folder (path or URI): its model.onnx when current, else the cache's, else exported now into the folder or, when
    the folder cannot be written, the cache. The session is built from the bytes that were checked, so another
    process replacing the file meanwhile cannot slip in other weights."""
    from langid.artifact import ModelError, load_network, read_metadata, weights_file
    from langid.uris import is_uri, local_folder

    meta = read_metadata(folder)
    local = local_folder(folder)
    weights = weights_file(local)  # refuses a folder holding pickles, like the torch path
    sha = weights_sha256(weights)
    beside, cached = os.path.join(local, ONNX_FILE), cache_path(sha)
    for path in (beside, cached):
        session = _current(path, sha, meta, threads, device)
        if session is not None:
            return session, meta, path
    model, meta = load_network(folder)  # weights that do not fit the metadata fail here, as in the torch path
    if weights_sha256(weights) != sha:
        raise ModelError(f"{weights}: the weights changed while being loaded; load the model again")
    data = export_onnx(model, meta["feature_config"].shape, sha)
    for path in ([] if is_uri(folder) else [beside]) + [cached]:  # a URI's local copy is per process: not worth it
        try:
            write_atomic(*filesystem(path), data)
        except OSError:
            continue
        return _session(data, threads, device), meta, path
    return _session(data, threads, device), meta, ""


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
