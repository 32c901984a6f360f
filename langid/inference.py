"""Prediction with a trained model folder: the Python API behind `langid predict` and the labeling job."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from langid.audio import AudioError, from_array, load_audio
from langid.features import window_features
from langid.model import load_model as _load_weights

UNKNOWN = "unknown"


@dataclass
class Segment:
    start: float
    end: float
    language: str
    confidence: float


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

    def __init__(self, model: torch.nn.Module, meta: dict, device: torch.device):
        self.model, self.meta, self.device = model, meta, device
        self.labels: list[str] = meta["labels"]
        self.cfg = meta["feature_config"]
        self.temperature = float(meta.get("calibration", {}).get("temperature", 1.0))

    # ----- arrays -----

    @torch.no_grad()
    def logprobs(self, specs: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """(n, C) log-probabilities for (n, n_mels, frames) log-mel windows."""
        out = []
        for i in range(0, len(specs), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(specs[i:i + batch_size], dtype=np.float32)).to(self.device)
            logits = self.model(x.unsqueeze(1)).float() / self.temperature
            out.append(torch.log_softmax(logits, dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def file_windows(self, samples: np.ndarray, hop_seconds: Optional[float] = None):
        """(specs, starts, speech mask) for a mono signal at the model's rate."""
        return window_features(samples, self.cfg, hop_seconds)

    def decide(self, path: str, window_logprobs: np.ndarray, starts: np.ndarray, speech: np.ndarray,
               duration: float, languages: Optional[Sequence[str]] = None, min_confidence: float = 0.0,
               top_k: int = 3) -> Prediction:
        """A file's answer from its windows: mean log-probability over speech windows, restricted and gated."""
        idx = self.candidate_indices(languages)
        pred = Prediction(path=path, duration=duration, windows=len(starts), windows_used=int(speech.sum()))
        lp = window_logprobs[:, idx]
        lp = lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)  # renormalise over the candidates
        names = [self.labels[i] for i in idx]
        win = self.cfg.window_seconds
        for s, row, sp in zip(starts, lp, speech):
            if sp:
                j = int(np.argmax(row))
                pred.segments.append(Segment(float(s), float(min(s + win, duration)), names[j], float(np.exp(row[j]))))
        if not speech.any():
            pred.language, pred.error = UNKNOWN, "no speech found"
            return pred
        mean = lp[speech].mean(axis=0)
        probs = np.exp(mean - np.logaddexp.reduce(mean))
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
                hop_seconds: Optional[float] = None) -> Prediction:
        """Predict one file path or mono array (give `sample_rate` with an array)."""
        return self.predict_many([source], sample_rate, languages, min_confidence, top_k, hop_seconds)[0]

    def predict_many(self, sources: Iterable, sample_rate: Optional[int] = None,
                     languages: Optional[Sequence[str]] = None, min_confidence: float = 0.0, top_k: int = 3,
                     hop_seconds: Optional[float] = None, batch_size: int = 32) -> list[Prediction]:
        """Predict many files with their windows batched together through the network."""
        self.candidate_indices(languages)  # bad candidates fail before any work
        results, pending = [], []
        for source in sources:
            name = "<array>" if isinstance(source, np.ndarray) else str(source)
            try:
                samples, duration = self._samples(source, sample_rate)
            except AudioError as e:
                results.append(Prediction(path=name, status="error", error=str(e)))
                continue
            specs, starts, speech = self.file_windows(samples, hop_seconds)
            results.append(None)
            pending.append((len(results) - 1, name, specs, starts, speech, duration))
        if pending:
            lp = self.logprobs(np.concatenate([p[2] for p in pending]), batch_size)
            offset = 0
            for i, name, specs, starts, speech, duration in pending:
                results[i] = self.decide(name, lp[offset:offset + len(specs)], starts, speech, duration, languages,
                                         min_confidence, top_k)
                offset += len(specs)
        return results

    def _samples(self, source, sample_rate: Optional[int]):
        if isinstance(source, np.ndarray):
            if sample_rate is None:
                raise ValueError("give sample_rate with an array")
            return from_array(source, sample_rate, self.cfg.sample_rate), len(source) / sample_rate
        audio = load_audio(source, self.cfg.sample_rate)
        return audio.samples, audio.duration


def check_languages(languages: Optional[Sequence[str]], labels: Sequence[str]) -> None:
    """Candidate languages must be ones the model knows."""
    unknown = [x for x in languages or () if x not in labels]
    if unknown:
        raise ValueError(f"languages {','.join(unknown)} are not in the model (it knows {','.join(labels)})")


def load_model(path: str, device: Optional[str] = None) -> LanguageIdentifier:
    """`langid.load_model(folder)`: a ready LanguageIdentifier (CUDA when present unless `device` says)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = _load_weights(path, dev)
    return LanguageIdentifier(model, meta, dev)
