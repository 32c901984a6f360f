"""Typed settings: the one feature configuration that flows from preprocessing to training to labeling, and the
training run's settings (schedule, batch, workers, data stream)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from langid.errors import BadValue
from langid.whisper import HOP_LENGTH as WHISPER_HOP, N_FFT as WHISPER_FFT, SAMPLE_RATE as WHISPER_RATE

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mlp")  # mlp: on encoder embeddings
# what a window becomes: langid's log-mel image, Whisper's log-mel (for Whisper itself), or Whisper's encoder
# output pooled over time (a frozen pretrained front-end for langid's own models)
FRONTENDS = ("logmel", "whisper-mel", "whisper-encoder")
TEXT_KEYS = ("frontend", "whisper")
WHISPER_STFT = (WHISPER_RATE, WHISPER_FFT, WHISPER_HOP)
# keys added after stores and models were first saved: absent in a saved configuration, they mean the old features
LATER_KEYS = ("frontend", "whisper", "embed_dim")
# ceilings that keep one window's arrays to a few hundred MiB, checked before a configuration read from a file is used
MAX_SAMPLE_RATE = 384_000
MAX_FFT = 1 << 16
MAX_MELS = 2048
MAX_WINDOW_VALUES = 1 << 26  # samples of one window, and values of its STFT or mel spectrogram
MAX_SECONDS = 4 * 3600.0  # longest audio file decoded (--max-seconds): a longer one is refused, not read into memory


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
    frontend: str = "logmel"
    whisper: str = ""  # the Whisper model of a whisper-* front-end: a size (base) or a folder
    embed_dim: int = 0  # whisper-encoder: the encoder's width

    def __post_init__(self):
        if self.frontend not in FRONTENDS:
            raise BadValue(f"frontend must be one of {', '.join(FRONTENDS)}, got {self.frontend!r}")
        if (self.frontend == "logmel") != (self.whisper == ""):
            raise BadValue("a whisper-* frontend needs a Whisper model name, and only it")
        if (self.frontend == "whisper-encoder") != (self.embed_dim > 0):
            raise BadValue("embed_dim is set for the whisper-encoder frontend, and only for it")
        if self.frontend != "logmel" and (self.sample_rate, self.n_fft, self.hop_length) != WHISPER_STFT:
            raise BadValue(f"Whisper's features take (sample_rate, n_fft, hop_length) = {WHISPER_STFT}")
        for f in dataclasses.fields(self):
            if f.name in TEXT_KEYS:
                continue
            if not math.isfinite(getattr(self, f.name)):
                raise BadValue(f"{f.name} must be a finite number, got {getattr(self, f.name)!r}")
        if self.sample_rate <= 0 or self.window_seconds <= 0:
            raise BadValue("sample_rate and window_seconds must be positive")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise BadValue(f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin} fmax={self.fmax}")
        if self.hop_length <= 0 or self.n_fft <= 0 or self.n_mels <= 0:
            raise BadValue("n_fft, hop_length and n_mels must be positive")
        if self.db_ceil <= self.db_floor:
            raise BadValue("db_ceil must be above db_floor")
        if self.top_db < 0:
            raise BadValue(f"top_db must be >= 0, got {self.top_db}")
        if self.sample_rate > MAX_SAMPLE_RATE or max(self.n_fft, self.hop_length) > MAX_FFT or self.n_mels > MAX_MELS:
            raise BadValue(f"need sample_rate <= {MAX_SAMPLE_RATE}, n_fft and hop_length <= {MAX_FFT}, n_mels <= "
                             f"{MAX_MELS}; got {self.sample_rate}, {self.n_fft}, {self.hop_length}, {self.n_mels}")
        values = max(self.window_samples, max(1 + self.n_fft // 2, self.n_mels) * self.window_frames)
        if values > MAX_WINDOW_VALUES:
            raise BadValue(f"one window would hold {values:,} values (limit {MAX_WINDOW_VALUES:,}); "
                             "shorten window_seconds or raise hop_length")

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * self.sample_rate))

    @property
    def window_frames(self) -> int:
        """Frames of one window's spectrogram (librosa's centred STFT)."""
        return 1 + self.window_samples // self.hop_length

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of one window's features as the store keeps them and the model takes them."""
        if self.frontend == "whisper-encoder":
            return 2, self.embed_dim  # mean and standard deviation over time
        if self.frontend == "whisper-mel":
            return self.n_mels, self.window_samples // self.hop_length  # Whisper drops the STFT's last frame
        return self.n_mels, self.window_frames

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, complete: bool = False) -> "FeatureConfig":
        """Checked values; `complete` for a saved configuration, where a default would silently change the features."""
        if not isinstance(d, dict):
            raise ValueError(f"feature config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown feature-config keys: {sorted(unknown)}")
        missing = known - set(d) - set(LATER_KEYS)
        if complete and missing:
            raise ValueError(f"missing feature-config keys: {sorted(missing)}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        out = {}
        for k, v in d.items():
            if k in TEXT_KEYS:
                if not isinstance(v, str) or len(v) > 4096:
                    raise ValueError(f"feature-config key {k!r} must be a string, got {v!r}")
                out[k] = v
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"feature-config key {k!r} must be a number, got {v!r}")
            if isinstance(v, int) and abs(v) > 2 ** 53:  # past float precision, and float() overflows at 10**309
                raise ValueError(f"feature-config key {k!r} is out of range")
            if types[k] in ("int", int) and float(v) != int(v):
                raise ValueError(f"feature-config key {k!r} must be a whole number, got {v!r}")
            out[k] = int(v) if types[k] in ("int", int) else float(v)
        return cls(**out)

    @classmethod
    def from_json(cls, s: str | bytes, complete: bool = False) -> "FeatureConfig":
        return cls.from_dict(json.loads(s), complete)


@dataclass
class Stage:
    """One stage of the staged fine-tune."""

    name: str
    epochs: int
    lr: float
    freeze: bool  # True: train the head only (fastai's freeze, BatchNorm stays trainable)
    lr_divisors: tuple = (1.0, 1.0, 1.0)  # per layer group: early body, late body, head

    def lrs(self) -> list[float]:
        return [self.lr / d for d in self.lr_divisors]


def default_schedule(epochs=(7, 12, 8), lrs=(1e-2, 1e-3, 1e-4), divisors=(9.0, 6.0, 1.0)) -> list[Stage]:
    """The write-up's schedule: head (lr 1e-2, 7), all layers at lr/9, lr/6, lr (12), head again (lr 1e-4, 8)."""
    return [
        Stage("head", epochs[0], lrs[0], freeze=True),
        Stage("unfrozen", epochs[1], lrs[1], freeze=False, lr_divisors=tuple(divisors)),
        Stage("head-again", epochs[2], lrs[2], freeze=True),
    ]


@dataclass
class TrainConfig:
    """Everything a training run needs; travels to the Ray Train workers as this object."""

    store: str
    output: str
    arch: str = "resnet152"
    stages: list = field(default_factory=default_schedule)
    batch_size: int = 32
    workers: int = 1
    gpu: bool = False
    amp: Optional[bool] = None  # mixed precision; None: on with CUDA, off on CPU
    cpus_per_worker: float = 1.0
    memory_per_worker: int = 0  # bytes reserved with Ray's scheduler; 0: none
    seed: int = 0
    spec_augment: bool = True
    max_failures: int = 2
    # the data stream: windows in each worker's shuffle buffer, and batches prepared ahead of the model
    shuffle_buffer: int = 1024
    prefetch_batches: int = 2

    @property
    def mixed_precision(self) -> bool:
        """fastai's AMP (float16 autocast, gradient scaling): CUDA only."""
        return self.gpu if self.amp is None else self.amp

    def to_dict(self) -> dict:
        return {**asdict(self), "stages": [asdict(s) for s in self.stages]}
