"""Log-mel features and spectrogram images: pure functions from arrays to arrays."""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np

from langid.audio import AudioError, dbfs
from langid.config import FeatureConfig

SHORT_SECONDS = 1.0


class FeatureError(AudioError):
    """Samples that have no features (NaN or infinite values); an AudioError too: to a job, the file's reason."""


# librosa's Slaney mel scale (librosa.hz_to_mel / mel_to_hz with htk=False)
MEL_STEP_HZ = 200.0 / 3
MIN_LOG_HZ = 1000.0
MIN_LOG_MEL = MIN_LOG_HZ / MEL_STEP_HZ
LOG_STEP = np.log(6.4) / 27.0
STFT_BLOCK_BYTES = 1 << 18  # librosa.util.MAX_MEM_BLOCK: frames transformed at once


def log_mel(samples: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """(n_mels, frames) float32 in [0, 1]: power mel spectrogram in dB relative to its maximum.

    Referencing the maximum (as the write-up's `power_to_db(..., ref=np.max)`) makes features
    independent of recording level; `top_db` and the floor/ceiling fix the range deterministically.
    Raises FeatureError for NaN/inf samples.
    """
    if samples.ndim != 1:
        raise ValueError(f"expected a mono signal (frames,), got shape {samples.shape}")
    check_finite(samples)
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak > 1.0:  # relative to the maximum, dB do not depend on level; this keeps float32 powers finite
        samples = samples / np.float32(peak)
    mel = _mel_basis(cfg) @ _stft_power(samples, cfg)
    db = _power_to_db(mel, amin=1e-10, top_db=cfg.top_db)
    return np.clip((db - cfg.db_floor) / (cfg.db_ceil - cfg.db_floor), 0.0, 1.0).astype(np.float32)


# librosa's STFT, mel filters and dB, the same operations in the same order (bit for bit the same values), without
# importing librosa: its import (scipy.signal, numba) cost every Ray worker 2 s of CPU before its first file.

def _stft_power(samples: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """|librosa.stft(samples, n_fft, hop_length, center=True, pad_mode="constant")|² in its (F-ordered) layout."""
    n_fft = cfg.n_fft
    if samples.dtype != np.float32 or len(samples) < n_fft:  # not what windows() gives: librosa itself
        import librosa

        stft = librosa.stft(samples, n_fft=n_fft, hop_length=cfg.hop_length, center=True, pad_mode="constant")
        return (np.abs(stft) ** 2).astype(np.float32)
    import scipy.fft

    frames = np.lib.stride_tricks.sliding_window_view(np.pad(samples, n_fft // 2), n_fft)[::cfg.hop_length]
    window = _hann(n_fft)
    out = np.empty((len(frames), 1 + n_fft // 2), np.complex64)
    step = max(1, STFT_BLOCK_BYTES // (n_fft * samples.itemsize))
    for start in range(0, len(frames), step):  # float64 products and transforms, as librosa's
        out[start:start + step] = scipy.fft.rfft(window * frames[start:start + step], axis=-1)
    return np.abs(out.T) ** 2


@lru_cache(maxsize=8)
def _hann(n: int) -> np.ndarray:
    """scipy.signal.get_window("hann", n, fftbins=True)."""
    if n <= 1:
        return np.ones(n)
    fac = np.linspace(-np.pi, np.pi, n + 1)
    w = np.zeros(n + 1)
    for k, a in enumerate((0.5, 0.5)):
        w += a * np.cos(k * fac)
    return w[:-1]


def _hz_to_mel(hz: float) -> np.ndarray:
    hz = np.asanyarray(hz)
    return MIN_LOG_MEL + np.log(hz / MIN_LOG_HZ) / LOG_STEP if hz >= MIN_LOG_HZ else hz / MEL_STEP_HZ


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    hz = MEL_STEP_HZ * mels
    log = mels >= MIN_LOG_MEL
    hz[log] = MIN_LOG_HZ * np.exp(LOG_STEP * (mels[log] - MIN_LOG_MEL))
    return hz


@lru_cache(maxsize=8)
def _mel_basis(cfg: FeatureConfig) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax): Slaney scale, Slaney norm, float32."""
    fft_hz = np.fft.rfftfreq(n=cfg.n_fft, d=1.0 / cfg.sample_rate)
    mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(cfg.fmin), _hz_to_mel(cfg.fmax), cfg.n_mels + 2))
    widths = np.diff(mel_hz)
    ramps = np.subtract.outer(mel_hz, fft_hz)
    weights = np.zeros((cfg.n_mels, 1 + cfg.n_fft // 2), np.float32)
    for i in range(cfg.n_mels):
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / widths[i], ramps[i + 2] / widths[i + 1]))
    weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, np.newaxis]
    return weights


def _power_to_db(power: np.ndarray, amin: float, top_db: float) -> np.ndarray:
    """librosa.power_to_db(power, ref=np.max, amin=amin, top_db=top_db)."""
    db = 10.0 * np.log10(np.maximum(amin, power))
    db -= 10.0 * np.log10(np.maximum(amin, np.max(power)))
    return np.maximum(db, db.max() - top_db)


def check_finite(samples: np.ndarray) -> None:
    if not np.all(np.isfinite(samples)):
        raise FeatureError("audio contains NaN or infinite samples")


def window_starts(n_samples: int, cfg: FeatureConfig, hop_seconds: float | None = None) -> list[int]:
    """Start samples of fixed-length windows covering a signal.

    A signal shorter than one window gives one (padded) window; a trailing remainder becomes
    its own padded window only when it holds at least half a window.
    """
    size = cfg.window_samples
    hop = size if hop_seconds is None else max(1, int(round(hop_seconds * cfg.sample_rate)))
    if n_samples <= size:
        return [0]
    starts = list(range(0, n_samples - size + 1, hop))
    tail = starts[-1] + hop
    if starts[-1] + size < n_samples and n_samples - tail >= size // 2:  # new audio left, tail half full
        starts.append(tail)
    return starts


def pad_or_crop(samples: np.ndarray, length: int) -> np.ndarray:
    """The first `length` samples, zero-padded at the end when fewer."""
    # librosa.util.fix_length, written out: importing it loads numba, 1.4 s of each worker's start-up
    if len(samples) >= length:
        return samples[:length]
    return np.pad(samples, (0, length - len(samples)))


def windows(samples: np.ndarray, cfg: FeatureConfig, hop_seconds: float | None = None):
    """Yield (start_seconds, window_samples, flags) for each fixed-length window."""
    size = cfg.window_samples
    for start in window_starts(len(samples), cfg, hop_seconds):
        chunk = samples[start : start + size]
        flags = []
        if len(chunk) < size:
            flags.append("padded")
        if dbfs(chunk) < cfg.silence_dbfs:
            flags.append("silent")
        yield start / cfg.sample_rate, pad_or_crop(chunk, size), flags


def window_features(samples: np.ndarray, cfg: FeatureConfig, hop_seconds: float | None = None, *,
                    source_dbfs: float):
    """(features (n, *cfg.shape) float32, start seconds (n,), speech mask (n,)) for a whole mono signal.

    A window is speech unless it is silent, or the whole source is (`source_dbfs`, its level before normalisation,
    judged as `file_flags` judges it): the rule the store's quality flags give evaluation."""
    specs, starts, flags = flagged_window_features(samples, cfg, hop_seconds)
    loud = not is_silent(source_dbfs, cfg)
    return specs, starts, np.array([loud and "silent" not in f for f in flags], dtype=bool)


def flagged_window_features(samples: np.ndarray, cfg: FeatureConfig, hop_seconds: float | None = None):
    """(features (n, *cfg.shape) float32, start seconds (n,), each window's flags) for a whole mono signal."""
    found = list(windows(samples, cfg, hop_seconds))
    starts = np.array([start for start, _, _ in found])
    lengths = [min(cfg.window_samples, len(samples) - int(round(s * cfg.sample_rate))) for s in starts]
    return featurize([chunk for _, chunk, _ in found], lengths, cfg), starts, [f for _, _, f in found]


def featurize(chunks: list, lengths: list, cfg: FeatureConfig) -> np.ndarray:
    """(n, *cfg.shape) float32 features of equal-length windows, of which the first `lengths` samples are audio."""
    if cfg.frontend == "logmel":
        return np.stack([log_mel(c, cfg) for c in chunks])
    from langid.whisper import shared_whisper

    for c in chunks:
        check_finite(c)
    whisper = shared_whisper(cfg.whisper)
    mels = np.stack([whisper.mel(c) for c in chunks])
    if cfg.frontend == "whisper-mel":
        return mels
    return whisper.embed(mels, np.array(lengths) // cfg.hop_length)


def is_silent(rms_dbfs: float, cfg: FeatureConfig) -> bool:
    """Whether a file is silent, judged on its source level before normalisation."""
    return rms_dbfs < cfg.silence_dbfs


def file_flags(duration: float, rms_dbfs: float, peak_dbfs: float, cfg: FeatureConfig) -> list[str]:
    """Quality flags of a whole file, judged on the source level before normalisation."""
    flags = []
    if is_silent(rms_dbfs, cfg):
        flags.append("silent")
    if duration < SHORT_SECONDS:
        flags.append("short")
    if peak_dbfs >= -0.01:
        flags.append("clipped")
    return flags


def to_image(spec: np.ndarray):
    """Grayscale PIL image of a [0, 1] spectrogram, low frequencies at the bottom."""
    from PIL import Image

    pixels = np.round(np.clip(spec, 0.0, 1.0)[::-1] * 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L")


def to_png(spec: np.ndarray) -> bytes:
    buf = io.BytesIO()
    to_image(spec).save(buf, format="PNG", compress_level=1)  # 4x faster than the default, ~10% larger
    return buf.getvalue()
