"""A small multilingual speech corpus synthesised with espeak-ng, in the Kaggle spoken-language-identification layout.

Speakers are espeak voice variants with their own pitch and rate; each reads one long "recording" of
pseudo-sentences (real word-frequency lists), cut into 10-s FLAC fragments like the LibriVox chapters.
"""
from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import os
import random
import re
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Optional

import numpy as np
import soundfile as sf

from langid.errors import BadValue
from langid.features import pad_or_crop
from langid.uris import atomic_output, list_files

SYNTH_RATE = 22050
FRAGMENT_SECONDS = 10
FRAGMENT_SAMPLES = SYNTH_RATE * FRAGMENT_SECONDS
PEAK = 10 ** (-1 / 20)  # -1 dBFS
SPEED_RANGE = (0.8, 1.2)
PITCH_CENTS = 200
SNR_DB = (5.0, 20.0)

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit() inside the library
_RATE, _PITCH, _RANGE = 1, 3, 4
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

# Human-sounding variants (klatt4/5 clip); listed by gender so train and test both get men and women.
MALE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "klatt", "klatt2", "klatt3", "klatt6")
FEMALE_VARIANTS = ("f1", "f2", "f3", "f4", "f5", "anika", "linda", "steph", "Annie", "aunty")

# espeak language code -> wordfreq code, where they differ
_WORDFREQ_ALIASES = {"cmn": "zh", "yue": "zh", "no": "nb", "hr": "sh", "sr": "sh", "bs": "sh"}
# for a few espeak languages that wordfreq lacks
_BUILTIN_WORDS = {
    "eo": "la kaj de en estas mi vi li ŝi ni ili ne por kun al sed kiu kio tio ĉi esti havi fari povas volas "
          "bona granda nova tago domo homo vorto urbo akvo tempo libro amiko",
    "la": "et in est non ad cum quod ut sed qui quae esse de ex enim etiam si nam per homo res deus rex terra "
          "aqua bellum tempus populus urbs vita magnus bonus",
    "sw": "na ya wa kwa katika ni la za kuwa hii huo yeye sisi wao mtu watu nyumba maji siku kazi shule mji nchi "
          "kubwa nzuri sana leo kesho jana chakula rafiki",
}


def _data_path() -> str:
    import espeakng_loader

    return espeakng_loader.get_data_path()


class _Engine:
    """The process's espeak-ng instance; synthesised int16 blocks land in `chunks` through the callback."""

    def __init__(self):
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, _data_path().encode(), _INITIALIZE_DONT_EXIT)
        if rate != SYNTH_RATE:
            raise RuntimeError(f"espeak-ng failed to initialise (returned {rate})")
        self.lib, self.chunks = lib, []
        self._callback = _SYNTH_CALLBACK(self._collect)  # must stay referenced: the library keeps only the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events):
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue synthesis


_ENGINE: Optional[_Engine] = None
_LOCK = threading.Lock()  # espeak-ng has global state and is not thread-safe


@lru_cache(maxsize=1)
def available_languages() -> list[str]:
    """Language codes espeak-ng has a voice for (the `language` lines of espeak-ng-data/lang)."""
    codes = set()
    for path in list_files(os.path.join(_data_path(), "lang")):
        with open(path, encoding="utf-8", errors="replace") as fh:
            codes.update(line.split()[1].lower() for line in fh if re.match(r"language\s+\S", line))
    return sorted(codes)


@lru_cache(maxsize=1)
def available_variants() -> dict[str, str]:
    """Voice variants in espeak-ng-data/voices/!v mapped to gender 'm' or 'f' (no gender line: the male default)."""
    folder = os.path.join(_data_path(), "voices", "!v")
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as fh:
            female = any(re.match(r"\s*gender\s+female", line, re.I) for line in fh)
        out[name] = "f" if female else "m"
    return out


def synthesize(text: str, voice: str, rate: int = 175, pitch: int = 50, pitch_range: int = 50) -> np.ndarray:
    """Speak `text` with `voice` ("en" or "en+f3"); float32 mono at SYNTH_RATE.

    espeak-ng keeps waveform state between calls, so repeating a call in one process can shift the output
    by a few samples; the corpus builder therefore synthesises each recording in a fresh process.
    """
    global _ENGINE
    language, _, variant = voice.partition("+")
    if language.lower() not in available_languages():
        raise BadValue(f"unknown language {language!r}: espeak-ng has no voice for it")
    if variant and variant not in available_variants():  # espeak silently ignores unknown variants
        raise BadValue(f"unknown voice variant {variant!r} (see espeak-ng-data/voices/!v)")
    with _LOCK:
        if _ENGINE is None:
            _ENGINE = _Engine()
        lib = _ENGINE.lib
        # on failure espeak keeps the previous voice, so the status must be checked
        if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise BadValue(f"espeak-ng cannot select voice {voice!r}")
        for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
            lib.espeak_SetParameter(param, int(value), 0)
        lib.espeak_ng_SetRandSeed(1)  # klatt voices add random breath noise
        _ENGINE.chunks = []
        data = text.encode("utf-8") + b"\0"
        status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
        chunks, _ENGINE.chunks = _ENGINE.chunks, []
    if status != _EE_OK:
        raise RuntimeError(f"espeak_Synth failed with status {status}")
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return (samples.astype(np.float32) / 32768.0).astype(np.float32)


# ---------------------------------------------------------------- text

@lru_cache(maxsize=None)
def _words(language: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The language's 2000 most frequent words with Zipf-like weights, so function words dominate as in real text."""
    import wordfreq

    code = _WORDFREQ_ALIASES.get(language, language)
    words: list[str] = []
    if code in wordfreq.available_languages():
        for wordlist in ("small", "best"):
            try:
                words = [w for w in wordfreq.top_n_list(code, 2000, wordlist=wordlist) if w.isalpha()]
                break
            except LookupError:
                continue
    if not words and language in _BUILTIN_WORDS:
        words = _BUILTIN_WORDS[language].split()
    if not words:
        raise BadValue(f"no word list for language {language!r}: wordfreq lacks it and there is no built-in list")
    return tuple(words), tuple(1.0 / (rank + 10) for rank in range(len(words)))


def pseudo_text(language: str, n_words: int, rng: random.Random) -> str:
    """Sentences of 6-14 frequency-weighted words, capitalised and ending with a period."""
    words, weights = _words(language)
    sentences, total = [], 0
    while total < n_words:
        n = rng.randint(6, 14)
        s = rng.choices(words, weights, k=n)
        sentences.append(s[0][:1].upper() + s[0][1:] + " " + " ".join(s[1:]) + ".")
        total += n
    return " ".join(sentences)


def check_language(language: str) -> None:
    """Raise ValueError unless `language` can be synthesised and named in the Kaggle pattern."""
    if not re.fullmatch(r"[a-z]{2,3}", language or "") or language not in available_languages():
        usable = [c for c in available_languages() if re.fullmatch(r"[a-z]{2,3}", c) and _has_words(c)]
        raise BadValue(f"unknown language {language!r}: espeak-ng has no voice for it "
                         f"(languages with a voice and a word list: {', '.join(usable)})")
    _words(language)


@lru_cache(maxsize=None)
def _has_words(language: str) -> bool:
    try:
        _words(language)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- speakers

@dataclass(frozen=True)
class Speaker:
    language: str
    split: str  # "train" or "test"
    variant: str
    gender: str
    pitch: int
    rate: int
    pitch_range: int
    recording_id: str

    @property
    def voice(self) -> str:
        return f"{self.language}+{self.variant}"


def _variant_pools(seed: int, train_speakers: int, test_speakers: int) -> dict[str, tuple[list[str], list[str]]]:
    """Disjoint (men, women) variant lists for train and test, shuffled by seed; test gets its share of each."""
    known = available_variants()
    rng = random.Random(f"variants:{seed}")
    pools: dict[str, tuple[list[str], list[str]]] = {"test": ([], []), "train": ([], [])}
    for g, (names, gender) in enumerate(((MALE_VARIANTS, "m"), (FEMALE_VARIANTS, "f"))):
        names = [v for v in names if known.get(v) == gender]
        rng.shuffle(names)
        k = max(-(-test_speakers // 2), round(len(names) * test_speakers / max(train_speakers + test_speakers, 1)))
        k = min(k, len(names) - -(-train_speakers // 2))
        pools["test"][g].extend(names[:k])
        pools["train"][g].extend(names[k:])
    for split, count in (("train", train_speakers), ("test", test_speakers)):
        if -(-count // 2) > min(map(len, pools[split])):
            raise BadValue(f"not enough voice variants for {train_speakers} training and {test_speakers} test "
                             f"speakers per language ({len(MALE_VARIANTS)} male, {len(FEMALE_VARIANTS)} female variants)")
    return pools


def make_speakers(language: str, train_speakers: int, test_speakers: int, seed: int = 0) -> list[Speaker]:
    """The speakers of a language, men and women alternating; test voices are never used for training.

    Every language gets the same voices with the same pitch and rate: each speaker reads in every
    language, so the voice says nothing about the language and a model must learn the language itself.
    The recording id is the voice's, shared by its recordings in all languages.
    """
    pools = _variant_pools(seed, train_speakers, test_speakers)
    chosen = [(split, pools[split][i % 2][i // 2]) for split, count in (("test", test_speakers), ("train", train_speakers))
              for i in range(count)]
    speakers = []
    for split, variant in chosen:
        rng = random.Random(f"speaker:{seed}:{variant}")
        pitch, rate, prange = rng.randint(35, 65), rng.randint(150, 195), rng.randint(35, 75)
        name = f"{split}:{variant}:{pitch}:{rate}:{prange}"
        # one id per voice across languages: the grouped split then holds a voice out in every language,
        # as a split by speaker does (the Kaggle ids name recordings, which never change language)
        rid = hashlib.md5(f"{name}|{seed}".encode()).hexdigest()
        speakers.append(Speaker(language, split, variant, available_variants()[variant], pitch, rate, prange, rid))
    return speakers


# ---------------------------------------------------------------- audio

def _peak_normalise(x: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    return (x * np.float32(PEAK / peak) if peak > 0 else x).astype(np.float32)


def _rng(*key) -> random.Random:
    return random.Random(":".join(map(str, key)))


def _np_rng(*key) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.md5(":".join(map(str, key)).encode()).hexdigest()[:16], 16))


@lru_cache(maxsize=4)
def _noise_bank(noise_dir: Optional[str]) -> tuple[np.ndarray, ...]:
    """Mono noise clips at SYNTH_RATE from noise_dir (impulse responses skipped); empty when none are usable."""
    from langid.audio import AUDIO_EXTENSIONS, AudioError, decode, resample

    if not noise_dir or not os.path.isdir(noise_dir):
        return ()
    clips = []
    for name in sorted(os.listdir(noise_dir)):
        if not name.lower().endswith(AUDIO_EXTENSIONS) or re.search(r"impulse|(^|[_\W])rir", name, re.I):
            continue
        try:
            samples, rate, _ = decode(os.path.join(noise_dir, name), max_seconds=600)
        except AudioError:
            continue
        clip = resample(samples, rate, SYNTH_RATE)
        if len(clip) >= SYNTH_RATE // 10 and np.any(clip):
            clips.append(clip)
    return tuple(clips)


def _coloured_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """White, pink or brown noise (power ~ 1/f^k, k = 0, 1, 2) by shaping a white spectrum."""
    k = int(rng.integers(0, 3))
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1]
    return np.fft.irfft(spectrum / f ** (k / 2), n).astype(np.float32)


def _add_noise(x: np.ndarray, rng: np.random.Generator, snr_db: float, bank: tuple[np.ndarray, ...]) -> np.ndarray:
    if bank:
        clip = bank[int(rng.integers(len(bank)))]
        start = int(rng.integers(len(clip)))
        noise = np.resize(np.roll(clip, -start), len(x))  # loop short clips to the fragment length
    else:
        noise = _coloured_noise(rng, len(x))
    p_signal = float(np.mean(np.square(x, dtype=np.float64)))
    p_noise = max(float(np.mean(np.square(noise, dtype=np.float64))), 1e-12)
    return (x + noise * np.float32(np.sqrt(p_signal / p_noise / 10 ** (snr_db / 10)))).astype(np.float32)


def augment(recording: np.ndarray, fragment: int, kind: str, index: int, key: str,
            bank: tuple[np.ndarray, ...] = ()) -> np.ndarray:
    """One augmented version of 0-based `fragment` of a recording: 'speed', 'pitch' or 'noise'."""
    rng = _rng(key, fragment, kind, index)
    start = fragment * FRAGMENT_SAMPLES
    if kind == "speed":
        # resampling changes tempo (and pitch, like sox speed); a faster version reads past the fragment's end
        import soxr

        factor = rng.uniform(*SPEED_RANGE)
        window = recording[start:start + int(round(FRAGMENT_SAMPLES * factor))]
        return pad_or_crop(soxr.resample(window, SYNTH_RATE * factor, SYNTH_RATE, quality="HQ").astype(np.float32),
                           FRAGMENT_SAMPLES)
    x = pad_or_crop(recording[start:start + FRAGMENT_SAMPLES], FRAGMENT_SAMPLES)
    if kind == "pitch":
        import librosa

        cents = rng.choice((-1, 1)) * rng.uniform(50, PITCH_CENTS)  # at least half a semitone, so it is audible
        return librosa.effects.pitch_shift(x, sr=SYNTH_RATE, n_steps=cents / 100, res_type="soxr_hq").astype(np.float32)
    if kind == "noise":
        return _add_noise(x, _np_rng(key, fragment, kind, index), rng.uniform(*SNR_DB), bank)
    raise ValueError(f"unknown augmentation {kind!r}")


def write_flac(path: str, samples: np.ndarray) -> None:
    """Write 16-bit FLAC atomically (see uris.atomic_output: scanners skip the hidden temporary name)."""
    with atomic_output(path) as tmp:
        sf.write(tmp, samples, SYNTH_RATE, format="FLAC", subtype="PCM_16")


# ---------------------------------------------------------------- corpus

def _outputs(speaker: Speaker, fragments: int, augmentations: dict[str, int]) -> list[tuple[int, str, int, str]]:
    """(0-based fragment, kind, 1-based index, file name) for everything the speaker's recording yields."""
    stem = f"{speaker.language}_{speaker.gender}_{speaker.recording_id}"
    out = []
    for frag in range(fragments):
        out.append((frag, "original", 0, f"{stem}.fragment{frag + 1}.flac"))
        if speaker.split == "train":  # like Kaggle: only training files are augmented
            for kind, count in augmentations.items():
                out += [(frag, kind, k, f"{stem}.fragment{frag + 1}.{kind}{k}.flac") for k in range(1, count + 1)]
    return out


def _record(speaker: Speaker, seconds: float, seed: int) -> np.ndarray:
    """Synthesise at least `seconds` of the speaker reading pseudo-text (one espeak call, deterministic per process)."""
    rng = _rng("text", seed, speaker.recording_id)
    n_words = int(seconds * speaker.rate / 60 * 1.2) + 20
    while True:
        audio = synthesize(pseudo_text(speaker.language, n_words, rng), speaker.voice,
                           speaker.rate, speaker.pitch, speaker.pitch_range)
        if len(audio) >= seconds * SYNTH_RATE:
            return audio
        n_words = int(n_words * 1.5)


def _missing(job: dict) -> list[tuple[int, str, int, str]]:
    return [o for o in _outputs(job["speaker"], job["fragments"], job["augmentations"])
            if not os.path.exists(os.path.join(job["folder"], o[3]))]


def _build_speaker(job: dict) -> int:
    """Write the missing files of one speaker's recording; returns how many were written."""
    speaker, todo = job["speaker"], _missing(job)
    if todo:
        # room after the last fragment for the fastest speed-up
        recording = _record(speaker, job["fragments"] * FRAGMENT_SECONDS * SPEED_RANGE[1] + 1, job["seed"])
        bank = _noise_bank(job["noise_dir"])
        for frag, kind, index, name in todo:
            if kind == "original":
                x = pad_or_crop(recording[frag * FRAGMENT_SAMPLES:(frag + 1) * FRAGMENT_SAMPLES], FRAGMENT_SAMPLES)
            else:
                x = augment(recording, frag, kind, index, speaker.recording_id, bank)
            write_flac(os.path.join(job["folder"], name), _peak_normalise(x))
    return len(todo)


def build_demo_corpus(root: str, languages: Iterable[str] = ("en", "de", "es"), train_speakers: int = 6,
                      test_speakers: int = 2, fragments: int = 6, speed: int = 1, pitch: int = 1, noise: int = 1,
                      seed: int = 0, noise_dir: Optional[str] = None, workers: int = 2, progress: bool = True) -> dict:
    """Synthesise the corpus under root/train/train and root/test/test; returns file counts and seconds taken.

    Idempotent: existing files are kept, so a rerun with the same arguments writes nothing.
    """
    start = time.time()
    languages = list(dict.fromkeys(languages))
    for name, value in (("train_speakers", train_speakers), ("test_speakers", test_speakers),
                        ("speed", speed), ("pitch", pitch), ("noise", noise)):
        if value < 0:
            raise BadValue(f"{name} must be >= 0, got {value}")
    if fragments < 1 or workers < 1:
        raise BadValue(f"fragments and workers must be >= 1, got {fragments} and {workers}")
    if not languages:
        raise BadValue("no languages given")
    for language in languages:
        check_language(language)
    root = os.path.abspath(root)
    folders = {"train": os.path.join(root, "train", "train"), "test": os.path.join(root, "test", "test")}
    noise_dir = os.path.abspath(noise_dir) if noise_dir else None
    augmentations = {"speed": speed, "pitch": pitch, "noise": noise}
    jobs = [{"speaker": s, "folder": folders[s.split], "fragments": fragments, "augmentations": augmentations,
             "seed": seed, "noise_dir": noise_dir}
            for language in languages for s in make_speakers(language, train_speakers, test_speakers, seed)]
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)

    counts = {split: {language: 0 for language in languages} for split in folders}
    for job in jobs:
        counts[job["speaker"].split][job["speaker"].language] += len(_outputs(job["speaker"], fragments, augmentations))
    pending = [job for job in jobs if _missing(job)]  # a complete rerun starts no process at all
    written = 0
    if pending:
        from tqdm import tqdm

        # A fresh process per speaker: espeak-ng output depends on what the process synthesised before, and
        # forkserver children start from a server that never synthesises, which keeps builds deterministic.
        # (ProcessPoolExecutor, unlike multiprocessing.Pool, fails instead of hanging when a worker crashes.)
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["langid.synthesis", "langid.audio", "librosa.effects", "librosa.core.spectrum",
                                  "librosa.util.utils", "soxr", "wordfreq", "espeakng_loader"])
        with ProcessPoolExecutor(min(workers, len(pending)), mp_context=ctx, max_tasks_per_child=1) as pool, \
                tqdm(total=len(pending), unit="speaker", desc="synthesising", disable=not progress) as bar:
            for future in as_completed([pool.submit(_build_speaker, job) for job in pending]):
                written += future.result()
                bar.update()
    return {
        "path": root,
        "files": counts,
        "total": sum(sum(c.values()) for c in counts.values()),
        "written": written,
        "speakers": {split: sum(j["speaker"].split == split for j in jobs) for split in folders},
        "noise": "files from " + noise_dir if _noise_bank(noise_dir) else "generated",
        "seconds": round(time.time() - start, 1),
    }


def build_long_files(root: str, out_dir: str, count: int = 3, fragments_per_language: int = 3) -> list[str]:
    """Long files that switch language: a corpus's test fragments of two languages back to back, in out_dir.

    Named `<lang1>-<lang2>_<k>.flac`; each holds `fragments_per_language` consecutive 10-s fragments of one
    test speaker in the first language, then as many of a test speaker in the second.
    """
    import soundfile as sf

    test = os.path.join(root, "test", "test")
    by_language: dict[str, list[str]] = {}
    for name in sorted(os.listdir(test)) if os.path.isdir(test) else []:
        if name.endswith(".flac"):
            by_language.setdefault(name.split("_", 1)[0], []).append(os.path.join(test, name))
    languages = sorted(by_language)
    if len(languages) < 2:
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for k in range(count):
        first, second = languages[k % len(languages)], languages[(k + 1) % len(languages)]
        path = os.path.join(out_dir, f"{first}-{second}_{k + 1}.flac")
        if not os.path.exists(path):
            parts = [sf.read(p, dtype="float32")[0] for lang in (first, second)
                     for p in by_language[lang][:fragments_per_language]]
            write_flac(path, np.concatenate(parts))
        written.append(path)
    return written
