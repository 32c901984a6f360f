"""The one feature configuration that flows from preprocessing to training to labeling."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@dataclass(frozen=True)
class FeatureConfig:
    """Log-mel parameters; saved in every store and every model so all jobs compute the same features."""

    sample_rate: int = 16000
    window_seconds: float = 10.0
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 64
    fmin: float = 20.0
    fmax: float = 8000.0
    top_db: float = 80.0
    # dB values are mapped to image/tensor range as (db - db_floor) / (db_ceil - db_floor), clipped to [0, 1]
    db_floor: float = -80.0
    db_ceil: float = 0.0
    # windows whose RMS is below this (dBFS) are flagged as silent
    silence_dbfs: float = -60.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"{f.name} must be a finite number, got {getattr(self, f.name)!r}")
        if self.sample_rate <= 0 or self.window_seconds <= 0:
            raise ValueError("sample_rate and window_seconds must be positive")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin} fmax={self.fmax}")
        if self.hop_length <= 0 or self.n_fft <= 0 or self.n_mels <= 0:
            raise ValueError("n_fft, hop_length and n_mels must be positive")
        if self.db_ceil <= self.db_floor:
            raise ValueError("db_ceil must be above db_floor")

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * self.sample_rate))

    @property
    def window_frames(self) -> int:
        """Frames of one window's spectrogram (librosa's centred STFT)."""
        return 1 + self.window_samples // self.hop_length

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown feature-config keys: {sorted(unknown)}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        out = {}
        for k, v in d.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"feature-config key {k!r} must be a number, got {v!r}")
            if types[k] in ("int", int) and float(v) != int(v):
                raise ValueError(f"feature-config key {k!r} must be a whole number, got {v!r}")
            out[k] = int(v) if types[k] in ("int", int) else float(v)
        return cls(**out)

    @classmethod
    def from_json(cls, s: str | bytes) -> "FeatureConfig":
        return cls.from_dict(json.loads(s))
