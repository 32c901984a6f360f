"""Audio I/O: decode anything libsndfile reads, downmix, resample, normalise level."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO, Callable, Union

import numpy as np
import soundfile as sf

from langid.config import MAX_SECONDS, FeatureConfig
from langid.errors import UserError, one_line

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64", ".caf")
TARGET_RMS_DBFS = -20.0
# gain is capped so that near-silence is not blown up to full scale
MAX_GAIN_DB = 40.0
READ_BLOCK_FRAMES = 1 << 16
# the highest rate audio is recorded at; a header claiming more is broken (and resampling it costs seconds)
MAX_SOURCE_RATE = 768_000

# a local path, the file's bytes, a binary file object, or a function that opens one (uris.opener, for a URI)
Source = Union[str, os.PathLike, BinaryIO, bytes, Callable[[], BinaryIO]]


class AudioError(UserError):
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


def decode(source: Source, max_seconds: float = MAX_SECONDS) -> tuple[np.ndarray, int, int]:
    """Read a file (a Source) to mono float32; returns (samples, rate, channels).

    Reads block by block and downmixes as it goes, so a header that declares a huge length costs
    only what the body really holds, and a file longer than `max_seconds` is refused early.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if callable(source):
        source = _open(source)
    if isinstance(source, (str, os.PathLike)):
        if os.path.isdir(source):
            raise AudioError("is a directory, not an audio file")
        if os.path.exists(source) and not os.path.isfile(source):  # a reader would block on a pipe
            raise AudioError("not a regular file (a pipe, socket or device)")
        try:
            size = os.path.getsize(source)
        except OSError as e:
            raise AudioError(f"cannot open: {e.strerror or e}") from None
        if size == 0:
            raise AudioError("empty file (0 bytes)")
        source = os.fsencode(source)  # as bytes, a name that is not UTF-8 opens too
    try:
        with sf.SoundFile(source) as f:
            rate, channels = f.samplerate, f.channels
            if not 0 < rate <= MAX_SOURCE_RATE or channels <= 0:
                raise AudioError(f"invalid header: {rate} Hz, {channels} channels")
            max_frames = int(max_seconds * rate)
            blocks, total = [], 0
            # read until the body ends, not SoundFile.blocks: that counts the frames the header declares, and past
            # a truncated body (an MP3 cut in half: 320,000 declared, 157,295 there) yields stale buffer contents
            while True:
                block = f.read(READ_BLOCK_FRAMES, dtype="float32", always_2d=True)
                if not len(block):
                    break
                blocks.append(downmix(block) if channels > 1 else block[:, 0].copy())
                total += len(block)
                if total > max_frames:
                    raise AudioError(f"longer than the limit of {max_seconds:.0f} s (raise --max-seconds)")
    except AudioError:
        raise
    except sf.LibsndfileError as e:
        raise AudioError(f"not a readable audio file ({one_line(e.error_string)})") from None
    except PermissionError:
        raise AudioError("permission denied") from None
    except OSError as e:
        raise AudioError(f"cannot read: {e.strerror or e}") from None
    except (RuntimeError, ValueError, TypeError) as e:  # libsndfile raises these on some corrupt bodies
        raise AudioError(f"corrupt audio data ({one_line(e)})") from None
    samples = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise AudioError("no audio samples (truncated or empty body)")
    if not np.all(np.isfinite(samples)):
        raise AudioError("audio contains NaN or infinite samples")
    return samples, rate, channels


def _open(opener: Callable[[], BinaryIO]) -> BinaryIO:
    """The seekable file `opener` opens, its failure an AudioError as a local file's would be."""
    try:
        f = opener()
    except (OSError, ValueError) as e:  # pyarrow: FileNotFoundError, ArrowInvalid (a ValueError), IOError
        raise AudioError(f"cannot open: {one_line(e)}") from None
    if f.seek(0, io.SEEK_END) == 0:
        raise AudioError("empty file (0 bytes)")
    f.seek(0)
    return f


def downmix(frames: np.ndarray) -> np.ndarray:
    """(frames, channels) -> mono float32, the mean summed in float64: float32 sums overflow near its limit."""
    return frames.mean(axis=1, dtype=np.float64).astype(np.float32)


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


def mono_array(samples: np.ndarray, rate: float) -> np.ndarray:
    """Mono float32 from an array of (frames,) or (frames, channels) at `rate`, checked.

    Raises AudioError for an array that cannot be audio (empty, NaN/inf, more than two dimensions).
    """
    if not (isinstance(rate, (int, float, np.number)) and 0 < rate < float("inf")):
        raise ValueError(f"sample rate must be a positive number, got {rate!r}")
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise AudioError(f"expected samples as (frames,) or (frames, channels), got shape {x.shape}")
    if x.size == 0:
        raise AudioError("no audio samples (empty array)")
    if not np.all(np.isfinite(x)):
        raise AudioError("audio contains NaN or infinite samples")
    if x.ndim == 2:
        x = downmix(x) if x.shape[1] > 1 else x[:, 0]
    return x


def from_array(samples: np.ndarray, rate: float, sample_rate: int = FeatureConfig.sample_rate) -> np.ndarray:
    """Mono, level-normalised float32 at `sample_rate` from an array of (frames,) or (frames, channels) at `rate`
    (checked as `mono_array` does)."""
    return _normalised(mono_array(samples, rate), rate, sample_rate)


def _normalised(mono: np.ndarray, rate: float, sample_rate: int) -> np.ndarray:
    # level first: a float file may hold values near float32's limit, which the resampling filter would overflow
    return resample(normalize(mono), rate, sample_rate)


def load_audio(source: Source, sample_rate: int = FeatureConfig.sample_rate,
               max_seconds: float = MAX_SECONDS) -> Audio:
    """Decode, downmix to mono, resample to `sample_rate` and normalise level."""
    raw, rate, channels = decode(source, max_seconds=max_seconds)
    return audio_from_array(raw, rate, sample_rate, channels)


def audio_from_array(raw: np.ndarray, rate: float, sample_rate: int = FeatureConfig.sample_rate,
                     channels: int | None = None) -> Audio:
    """An `Audio` (samples as `from_array` makes them, and the source's level) from decoded samples. The level is
    the mono mix's, as for a decoded file (whose channels are mixed while it is read)."""
    mono = mono_array(raw, rate)
    return Audio(
        samples=_normalised(mono, rate, sample_rate),
        sample_rate=sample_rate,
        source_sample_rate=rate,
        source_channels=channels or (np.shape(raw)[1] if np.ndim(raw) == 2 else 1),
        duration=len(mono) / rate,
        peak_dbfs=20.0 * np.log10(max(float(np.max(np.abs(mono))), 1e-10)),
        rms_dbfs=dbfs(mono),
    )
