"""Prediction with a trained model folder: the Python API behind `langid predict` and the labeling job."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

import numpy as np

from langid.audio import Audio, AudioError, audio_from_array, load_audio
from langid.errors import BadValue
from langid.features import window_features
from langid.onnxmodel import INPUT, OUTPUT, cuda_available as _ort_cuda, log_softmax, onnx_session
from langid.timeline import SWITCH_PENALTY, Segment, check_switch_penalty, smooth_path

if TYPE_CHECKING:
    import torch

UNKNOWN = "unknown"
BACKENDS = ("onnx", "torch")


@dataclass
class Prediction:
    """One file's answer: the language (or 'unknown'), its probability, the full distribution and a timeline."""

    path: str
    language: Optional[str] = None
    confidence: float = 0.0
    probabilities: dict = field(default_factory=dict)
    top: list = field(default_factory=list)  # [(language, probability)] best first
    duration: float = 0.0
    windows: int = 0
    windows_used: int = 0
    segments: list = field(default_factory=list)
    status: str = "ok"
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class LanguageIdentifier:
    """A loaded model: features exactly as at training time, batched forward, calibrated probabilities."""

    backend = "torch"
    default_batch_size = 32

    def __init__(self, model: torch.nn.Module, meta: dict, device: torch.device | str):
        self.model, self.meta, self.device = model, meta, device
        self.labels: list[str] = meta["labels"]
        self.cfg = meta["feature_config"]
        self.temperature = float(meta.get("calibration", {}).get("temperature", 1.0))

    # ----- arrays -----

    def logprobs(self, specs: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
        """(n, C) log-probabilities for (n, n_mels, frames) log-mel windows."""
        import torch

        batch_size = batch_size or self.default_batch_size
        out = []
        with torch.no_grad():
            for i in range(0, len(specs), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(specs[i:i + batch_size], dtype=np.float32)).to(self.device)
                logits = self.model(x.unsqueeze(1)).float() / self.temperature
                out.append(torch.log_softmax(logits, dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def file_windows(self, audio: Audio, hop_seconds: Optional[float] = None):
        """(specs, starts, speech mask) for a file's audio at the model's rate."""
        return window_features(audio.samples, self.cfg, hop_seconds, source_dbfs=audio.rms_dbfs)

    def decide(self, path: str, window_logprobs: np.ndarray, starts: np.ndarray, speech: np.ndarray,
               duration: float, languages: Optional[Sequence[str]] = None, min_confidence: float = 0.0,
               top_k: int = 3, switch_penalty: float = SWITCH_PENALTY) -> Prediction:
        """A file's answer from its windows: the file score over the candidates (metrics.aggregate_windows, the rule
        evaluation scores by too), gated by `min_confidence`.

        The timeline is the speech windows' smoothed path; the answer does not depend on `switch_penalty`."""
        from langid.metrics import aggregate_windows

        idx = self.candidate_indices(languages)
        speech = np.asarray(speech, dtype=bool)  # an empty list from a row would index as floats
        pred = Prediction(path=path, duration=duration, windows=len(starts), windows_used=int(speech.sum()))
        lp = restrict(window_logprobs, idx)
        names = [self.labels[i] for i in idx]
        win = self.cfg.window_seconds
        spoken = lp[speech]
        for s, row, j in zip(np.asarray(starts)[speech], spoken, smooth_path(spoken, switch_penalty)):
            pred.segments.append(Segment(float(s), float(min(s + win, duration)), names[j], float(np.exp(row[j]))))
        score = aggregate_windows(lp, [path] * len(lp), speech)[1]  # this file's row; none without windows
        if not np.isfinite(score).any():
            pred.language, pred.error = UNKNOWN, "no speech found"
            return pred
        probs = np.exp(score[0])
        order = np.argsort(-probs)
        pred.probabilities = {names[i]: float(probs[i]) for i in range(len(names))}
        pred.top = [(names[i], float(probs[i])) for i in order[:top_k]]
        pred.confidence = float(probs[order[0]])
        pred.language = names[order[0]] if pred.confidence >= min_confidence else UNKNOWN
        return pred

    def candidate_indices(self, languages: Optional[Sequence[str]]) -> list[int]:
        if not languages:
            return list(range(len(self.labels)))
        check_languages(languages, self.labels)
        return [self.labels.index(x) for x in dict.fromkeys(languages)]

    # ----- files -----

    def predict(self, source: Union[str, os.PathLike, np.ndarray], sample_rate: Optional[int] = None,
                languages: Optional[Sequence[str]] = None, min_confidence: float = 0.0, top_k: int = 3,
                hop_seconds: Optional[float] = None, switch_penalty: float = SWITCH_PENALTY) -> Prediction:
        """Predict one file path or mono array (give `sample_rate` with an array)."""
        return self.predict_many([source], sample_rate, languages, min_confidence, top_k, hop_seconds,
                                 switch_penalty=switch_penalty)[0]

    def predict_many(self, sources: Iterable, sample_rate: Optional[int] = None,
                     languages: Optional[Sequence[str]] = None, min_confidence: float = 0.0, top_k: int = 3,
                     hop_seconds: Optional[float] = None, batch_size: Optional[int] = None,
                     switch_penalty: float = SWITCH_PENALTY) -> list[Prediction]:
        """Predict many files with their windows batched together through the network."""
        self.candidate_indices(languages)  # bad candidates and penalties fail before any work
        check_switch_penalty(switch_penalty)
        results, pending = [], []
        for source in sources:
            name = "<array>" if isinstance(source, np.ndarray) else str(source)
            try:
                audio = self._audio(source, sample_rate)
            except AudioError as e:
                results.append(Prediction(path=name, status="error", error=str(e)))
                continue
            specs, starts, speech = self.file_windows(audio, hop_seconds)
            results.append(None)
            pending.append((len(results) - 1, name, specs, starts, speech, audio.duration))
        if pending:
            lp = self.logprobs(np.concatenate([p[2] for p in pending]), batch_size)
            offset = 0
            for i, name, specs, starts, speech, duration in pending:
                results[i] = self.decide(name, lp[offset:offset + len(specs)], starts, speech, duration, languages,
                                         min_confidence, top_k, switch_penalty)
                offset += len(specs)
        return results

    def _audio(self, source, sample_rate: Optional[int]) -> Audio:
        if isinstance(source, np.ndarray):
            if sample_rate is None:
                raise ValueError("give sample_rate with an array")
            return audio_from_array(source, sample_rate, self.cfg.sample_rate)
        from langid.uris import opener

        return load_audio(opener(source) if isinstance(source, str) else source, self.cfg.sample_rate)


class OnnxIdentifier(LanguageIdentifier):
    """The same model through ONNX Runtime (langid/onnxmodel.py): the same answers, faster on CPU."""

    backend = "onnx"
    default_batch_size = 16  # benchmarks/onnx_speed.py: 16 and 32 fastest on one thread, 64 slower

    def __init__(self, session, meta: dict, device: str, onnx_path: str = ""):
        super().__init__(None, meta, device)
        self.session, self.onnx_path = session, onnx_path

    def logprobs(self, specs: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
        batch_size = batch_size or self.default_batch_size
        out = []
        for i in range(0, len(specs), batch_size):
            x = np.ascontiguousarray(specs[i:i + batch_size], dtype=np.float32)
            out.append(log_softmax(self.session.run([OUTPUT], {INPUT: x})[0] / np.float32(self.temperature)))
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)


def restrict(window_logprobs: np.ndarray, candidates: Sequence[int]) -> np.ndarray:
    """Window log-probabilities over the candidate classes only, renormalised to sum to one."""
    lp = window_logprobs[:, candidates]
    return lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)


def check_languages(languages: Optional[Sequence[str]], labels: Sequence[str]) -> None:
    """Candidate languages must be ones the model knows."""
    unknown = [x for x in languages or () if x not in labels]
    if unknown:
        raise BadValue(f"languages {','.join(unknown)} are not in the model (it knows {','.join(labels)})")


def load_model(path: str, device: Optional[str] = None, window_seconds: Optional[float] = None,
               threads: int = 0, backend: str = "onnx") -> LanguageIdentifier:
    """`langid.load_model(folder)`: a ready LanguageIdentifier (CUDA when present unless `device` says); a folder
    trained by langid, or `whisper:<size or folder>` for Whisper's own language detection (`window_seconds` long).

    A trained model runs with `backend` "onnx" (ONNX Runtime, its model.onnx exported on first use when missing or
    stale; on a CUDA device without ONNX Runtime's CUDA provider, torch runs it instead, as the GPU is faster) or
    "torch" (the reference). `threads`: intra-op threads for ONNX Runtime, torch and Whisper (0: OMP_NUM_THREADS,
    which Ray sets to a worker's CPUs, else the libraries' own choice). Whisper runs on CTranslate2 whatever the
    backend. On CPU with ONNX Runtime, torch is not imported."""
    from langid.whisper import parse_spec

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    name = parse_spec(path)
    if name is not None:
        return WhisperIdentifier(name, device, window_seconds, threads)
    _no_window(window_seconds)
    threads = threads or default_threads()
    device = str(device) if device else ("cuda" if cuda_present() else "cpu")
    if backend == "onnx" and (device == "cpu" or _ort_cuda()):
        session, meta, onnx_path = onnx_session(path, device, threads)
        return OnnxIdentifier(session, meta, device, onnx_path)
    import torch

    from langid.artifact import load_network

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    model, meta = load_network(path, dev)
    return LanguageIdentifier(model, meta, dev)


def default_threads() -> int:
    """OMP_NUM_THREADS when set (Ray sets it to a worker's CPUs), else 0: each library's own default."""
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


def cuda_present() -> bool:
    """Whether torch sees a CUDA device, without importing torch (seconds) where no NVIDIA driver is installed."""
    import sys

    driver = ("/dev/nvidiactl", "/dev/dxg")  # NVIDIA's Linux driver; WSL2's GPU
    if sys.platform == "darwin" or (sys.platform.startswith("linux") and not any(map(os.path.exists, driver))):
        return False
    import torch

    return torch.cuda.is_available()


def describe_model(path: str, window_seconds: Optional[float] = None, backend: str = "onnx") -> dict:
    """A model's metadata (labels, feature configuration, architecture), checked against its weights before a job
    starts. For ONNX Runtime through a current model.onnx (exported now when missing, so the job's actors find it),
    which needs no torch in the driver; for torch from the weights' header."""
    from langid.artifact import inspect_model
    from langid.whisper import DEFAULT_WINDOW_SECONDS, describe, parse_spec

    name = parse_spec(path)
    if name is not None:
        return describe(name, window_seconds or DEFAULT_WINDOW_SECONDS)
    _no_window(window_seconds)
    if backend == "onnx":
        return onnx_session(path, "cpu", 1)[1]
    return inspect_model(path)


def _no_window(window_seconds: Optional[float]) -> None:
    if window_seconds is not None:
        raise BadValue("a window length is given to Whisper models only; a trained model keeps its own")


class WhisperIdentifier(LanguageIdentifier):
    """Whisper's language detection on each window (input as short as the window: Whisper need not see 30 s),
    answered and aggregated exactly as a trained model's windows."""

    backend = "ctranslate2"
    default_batch_size = 8

    def __init__(self, name: str, device: Optional[str] = None, window_seconds: Optional[float] = None,
                 threads: int = 0):
        from langid.whisper import DEFAULT_WINDOW_SECONDS, Whisper

        import ctranslate2

        if device is None:
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        self.whisper = Whisper(name, device, threads or default_threads() or os.cpu_count() or 1)
        super().__init__(None, self.whisper.metadata(window_seconds or DEFAULT_WINDOW_SECONDS), self.whisper.device)

    def logprobs(self, specs: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
        batch_size = batch_size or self.default_batch_size
        out = [self.whisper.language_probs(specs[i:i + batch_size]) for i in range(0, len(specs), batch_size)]
        if not out:
            return np.zeros((0, len(self.labels)), np.float32)
        probs = np.maximum(np.concatenate(out), 1e-12)
        return np.log(probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
