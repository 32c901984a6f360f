"""Audio I/O: decode anything libsndfile reads, downmix, resample, normalise level."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO, Union

import numpy as np
import soundfile as sf

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64", ".caf")
TARGET_RMS_DBFS = -20.0
# gain is capped so that near-silence is not blown up to full scale
MAX_GAIN_DB = 40.0
READ_BLOCK_FRAMES = 1 << 16

Source = Union[str, os.PathLike, BinaryIO, bytes]


class AudioError(Exception):
    """A file that cannot be used as audio; the message is the one-line reason shown to users."""


@dataclass
class Audio:
    samples: np.ndarray  # mono float32 at `sample_rate`
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    duration: float  # seconds, of the source
    peak_dbfs: float  # before normalisation
    rms_dbfs: float  # before normalisation


def dbfs(x: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    return 20.0 * np.log10(max(rms, 1e-10))


def decode(source: Source, max_seconds: float = 4 * 3600.0) -> tuple[np.ndarray, int, int]:
    """Read a file (path, bytes or binary file object) to mono float32; returns (samples, rate, channels).

    Reads block by block and downmixes as it goes, so a header that declares a huge length costs
    only what the body really holds, and a file longer than `max_seconds` is refused early.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        if os.path.isdir(source):
            raise AudioError("is a directory, not an audio file")
        try:
            size = os.path.getsize(source)
        except OSError as e:
            raise AudioError(f"cannot open: {e.strerror or e}") from None
        if size == 0:
            raise AudioError("empty file (0 bytes)")
    try:
        with sf.SoundFile(source) as f:
            rate, channels = f.samplerate, f.channels
            if rate <= 0 or channels <= 0:
                raise AudioError(f"invalid header: {rate} Hz, {channels} channels")
            max_frames = int(max_seconds * rate)
            blocks, total = [], 0
            while True:
                block = f.read(READ_BLOCK_FRAMES, dtype="float32", always_2d=True)
                if not len(block):
                    break
                blocks.append(block.mean(axis=1, dtype=np.float32) if channels > 1 else block[:, 0].copy())
                total += len(block)
                if total > max_frames:
                    raise AudioError(f"longer than the limit of {max_seconds:.0f} s (raise --max-seconds)")
    except AudioError:
        raise
    except sf.LibsndfileError as e:
        raise AudioError(f"not a readable audio file ({_clean(e)})") from None
    except PermissionError:
        raise AudioError("permission denied") from None
    except OSError as e:
        raise AudioError(f"cannot read: {e.strerror or e}") from None
    except (RuntimeError, ValueError, TypeError) as e:  # libsndfile raises these on some corrupt bodies
        raise AudioError(f"corrupt audio data ({_clean(e)})") from None
    samples = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise AudioError("no audio samples (truncated or empty body)")
    if not np.all(np.isfinite(samples)):
        raise AudioError("audio contains NaN or infinite samples")
    return samples, rate, channels


def _clean(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def resample(samples: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    if orig_rate == target_rate:
        return samples.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(samples, orig_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def normalize(samples: np.ndarray, target_dbfs: float = TARGET_RMS_DBFS) -> np.ndarray:
    """Scale to a target RMS level, with capped gain and no clipping past full scale."""
    level = dbfs(samples)
    gain_db = min(target_dbfs - level, MAX_GAIN_DB)
    out = samples * np.float32(10 ** (gain_db / 20))
    peak = float(np.max(np.abs(out))) if out.size else 0.0
    if peak > 1.0:
        out /= np.float32(peak)
    return out.astype(np.float32, copy=False)


def load_audio(source: Source, sample_rate: int = 16000, max_seconds: float = 4 * 3600.0) -> Audio:
    """Decode, downmix to mono, resample to `sample_rate` and normalise level."""
    raw, rate, channels = decode(source, max_seconds=max_seconds)
    peak = float(np.max(np.abs(raw)))
    level = dbfs(raw)
    samples = normalize(resample(raw, rate, sample_rate))
    return Audio(
        samples=samples,
        sample_rate=sample_rate,
        source_sample_rate=rate,
        source_channels=channels,
        duration=len(raw) / rate,
        peak_dbfs=20.0 * np.log10(max(peak, 1e-10)),
        rms_dbfs=level,
    )
