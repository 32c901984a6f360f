"""Bad input: a corpus of broken, odd and hostile files made here, run through both jobs' real entry points.

Every input file must end as exactly one record: its windows (preprocess) or its label row (label) when it
can be used, an error with a one-line reason when it cannot. Odd but good files (telephone rate, 8 channels
at 96 kHz, silence, clipping, huge float values) get a correct record; nothing crashes or hangs. The jobs run
as subprocesses joining the test's Ray, under a generous timeout that detects a hang (not a speed check).
Hostile model folders and metadata are refused with one line before any work.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from conftest import FREQ, REPO, TONE_CFG, tone, voice
from langid.audio import AudioError, decode
from langid.config import FeatureConfig
from langid.artifact import ModelError
from langid.store import ERRORS, WINDOWS
from test_label import RAY_LOG, gcs_address, job_env, tree_snapshot

pytestmark = pytest.mark.slow

RATE = TONE_CFG.sample_rate
FEATURES = FeatureConfig(window_seconds=1.0, n_mels=32)  # the preprocessing run's: small, quick windows
MAX_SECONDS = 600  # the jobs' --max-seconds here: the hour-long file must be refused by it
HANG_GUARD = 420  # seconds; a job that takes this long on a few dozen small files has hung
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                    "0000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


@dataclass
class Case:
    """One input of the corpus and what the jobs must make of it."""

    expect: str  # "ok" or "error"
    reason: str = ""  # error: words the one-line reason must contain (lower case)
    language: str | None = None  # ok: the label job's answer ("unknown" for silence)
    flags: tuple = ()  # ok: quality flags preprocessing must set
    rate: int | None = None  # ok: source sample rate
    channels: int = 1
    twin: tuple | None = None  # ok: (samples, rate) the file was made from; the label job answers as for them


def audio_bytes(x: np.ndarray, rate: int = RATE, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def zip_bytes(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def tar_bytes(members: dict, mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def write_hour(path: Path) -> None:
    """An hour of 8 kHz 16-bit mono (57.6 MB), written a minute at a time."""
    minute = (0.3 * 32767 * np.sin(2 * np.pi * FREQ["en"] * np.arange(60 * 8000) / 8000)).astype(np.int16)
    with sf.SoundFile(str(path), "w", 8000, 1, "PCM_16", format="WAV") as f:
        for _ in range(60):
            f.write(minute)


def build_corpus(root: Path) -> tuple[dict, bool]:
    """The corpus under root/en and root/de (the language folders preprocessing wants): ({relative path: Case},
    whether a chmod 000 file is still readable, as for root). Non-inputs (folders, a link to a folder) get no Case."""
    en = voice("en", 2.0, 1)
    EN = (en, RATE)  # the twin of the files made from it
    wav_en, flac_en = audio_bytes(en), audio_bytes(en, fmt="FLAC")
    mp3_en = audio_bytes(en, fmt="MP3", subtype="MPEG_LAYER_III") if "MP3" in sf.available_formats() else None
    loud = (voice("de", 2.0, 3) * 1e38 * 3).astype(np.float32)  # finite, past what resampling filters survive
    telephone, eight = tone(FREQ["en"], 2.0, 8000), np.tile(tone(FREQ["de"], 1.5, 96000)[:, None], 8)
    clipped = np.clip(voice("de", 2.0, 4) * 30, -1, 1)
    nan, inf = en.copy(), en.copy()
    nan[1000], inf[1000] = np.nan, np.inf
    body_at = wav_en.index(b"data") + 8  # where the samples start (44; the fmt chunk's body is at 20-36)
    huge_body = patched(patched(wav_en[:body_at + 3200], 4, "<I", 0x7FFFFFF0), body_at - 4, "<I", 0x7FFFFFF0)
    cases = {
        # no audio at all
        "en/empty.wav": (b"", Case("error", "empty")),
        "en/empty.flac": (b"", Case("error", "empty")),
        "en/notes.wav": (b"these are my notes, not audio\n" * 40, Case("error", "not a readable audio file")),
        "en/picture.flac": (PNG, Case("error", "not a readable audio file")),
        "en/picture.wav": (PNG, Case("error", "not a readable audio file")),
        "en/archive.wav": (zip_bytes({"a.wav": wav_en}), Case("error", "not a readable audio file")),
        # truncated
        "en/cut-half.flac": (flac_en[: len(flac_en) // 2], Case("error", "not a readable audio file")),
        "en/cut-header.flac": (flac_en[:30], Case("error", "not a readable audio file")),
        "en/cut-in-fmt.wav": (wav_en[:20], Case("error", "not a readable audio file")),
        "en/header-only.wav": (wav_en[:body_at], Case("error", "no audio samples")),
        "en/cut-body.wav": (wav_en[: body_at + 2 * 24000], Case("ok", language="en", rate=RATE,  # 1.5 s of 2
                                                                twin=(en[:24000], RATE))),
        # wrong headers
        "en/garbage-fmt.wav": (wav_en[:20] + bytes(range(7, 23)) + wav_en[36:],
                               Case("error", "not a readable audio file")),
        "en/zero-channels.wav": (patched(wav_en, 22, "<H", 0), Case("error", "not a readable audio file")),
        "en/zero-rate.wav": (patched(wav_en, 24, "<I", 0), Case("error", "not a readable audio file")),
        "en/65535-channels.wav": (patched(wav_en, 22, "<H", 65535), Case("error", "not a readable audio file")),
        "en/gigahertz.wav": (patched(wav_en, 24, "<I", 10 ** 9), Case("error", "invalid header: 1000000000 hz")),
        "en/huge-declared-length.wav": (huge_body, Case("ok", flags=("short",), rate=RATE)),
        "en/flac-named.wav": (flac_en, Case("ok", language="en", rate=RATE, twin=EN)),
        # odd but good
        "en/clip-0.05s.wav": (audio_bytes(en[:800]), Case("ok", flags=("short", "padded"), rate=RATE)),
        "en/telephone-8k-ulaw.wav": (audio_bytes(telephone, 8000, subtype="ULAW"),
                                     Case("ok", language="en", rate=8000, twin=(telephone, 8000))),
        "de/96k-8-channels.wav": (audio_bytes(eight, 96000, subtype="PCM_24"),  # 1.5 s: ends in a padded window
                                  Case("ok", language="de", rate=96000, channels=8, twin=(eight, 96000))),
        "en/silence.flac": (audio_bytes(np.zeros(2 * RATE, np.float32), fmt="FLAC"),
                            Case("ok", language="unknown", flags=("silent",), rate=RATE)),
        "de/clipped.wav": (audio_bytes(clipped), Case("ok", language="de", flags=("clipped",), rate=RATE,
                                                     twin=(clipped, RATE))),
        "de/loud-float.wav": (audio_bytes(loud, 22050, subtype="FLOAT"),
                              Case("ok", language="de", rate=22050, twin=(loud, 22050))),
        "en/nan.wav": (audio_bytes(nan, subtype="FLOAT"), Case("error", "nan or infinite")),
        "en/inf.wav": (audio_bytes(inf, subtype="FLOAT"), Case("error", "nan or infinite")),
        "en/UPPER CASE.WAV": (wav_en, Case("ok", language="en", rate=RATE, twin=EN)),
        # names
        "en/with  spaces .wav": (wav_en, Case("ok", language="en", rate=RATE, twin=EN)),
        "en/quotes 'single' \"double\", comma.wav": (wav_en, Case("ok", language="en", rate=RATE, twin=EN)),
        "en/new\nline.wav": (wav_en, Case("ok", language="en", rate=RATE, twin=EN)),
        "en/ünïcødé 日本語 🎧.flac": (flac_en, Case("ok", language="en", rate=RATE, twin=EN)),
        os.fsdecode(b"en/caf\xe9 \xff.wav"): (wav_en, Case("ok", language="en", rate=RATE, twin=EN)),  # not UTF-8
        "en/folder.wav/inside.wav": (wav_en, Case("ok", language="en", rate=RATE, twin=EN)),  # in a folder .wav
    }
    if mp3_en is not None:
        cases["en/good.mp3"] = (mp3_en, Case("ok", language="en", rate=RATE, twin=EN))
        cases["en/cut-half.mp3"] = (mp3_en[: len(mp3_en) // 2], Case("ok", rate=RATE))  # what is there decodes
        cases["en/cut-tiny.mp3"] = (mp3_en[:100], Case("error", "not a readable audio file"))
    out = {}
    for rel, (data, case) in cases.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out[rel] = case
    write_hour(root / "en" / "hour-long.wav")
    out["en/hour-long.wav"] = Case("error", f"longer than the limit of {MAX_SECONDS} s")
    for name, target in (("loop-a.wav", "loop-b.wav"), ("loop-b.wav", "loop-a.wav"), ("self.wav", "self.wav")):
        os.symlink(target, root / "en" / name)
        out[f"en/{name}"] = Case("error", "too many levels of symbolic links")
    os.symlink("no-such-file.wav", root / "en" / "dangling.wav")
    out["en/dangling.wav"] = Case("error", "no such file")
    os.symlink("..", root / "en" / "up")  # a folder loop: not followed, so no file is listed twice
    os.mkfifo(root / "en" / "pipe.wav")  # a reader that opened it would wait forever
    out["en/pipe.wav"] = Case("error", "not a regular file")
    (root / "en" / "notes.txt").write_text("not an audio file name: no record")
    locked = root / "en" / "locked.wav"
    locked.write_bytes(wav_en)
    locked.chmod(0)
    try:
        locked.read_bytes()
        readable = True  # root: chmod 000 does not stop reads
    except PermissionError:
        readable = False
    out["en/locked.wav"] = Case("ok", language="en", rate=RATE, twin=EN) if readable else Case("error", "permission")
    return out, readable


def build_archives(base: Path, wav: bytes) -> dict:
    """Archives with members of every kind, for the label job (preprocessing reads no archives): {key: Case}."""
    en_x, de_x, flac_x = sf.read(io.BytesIO(wav), dtype="float32"), (voice("de", 2.0, 5), RATE), voice("en", 2.0, 6)
    de = audio_bytes(de_x[0])
    base.mkdir(parents=True)
    tar = base / "bundle.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as t:
        def add(name, data=b"", kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data)
            t.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("top/ok.wav", wav)
        add("../escape.wav", de)
        add("/etc/absolute.wav", de)
        add("top/inner.zip", zip_bytes({"x.wav": wav}))
        add("top/inner.tar.gz", tar_bytes({"x.wav": wav}, "w:gz"))
        add("top/zip-named.wav", zip_bytes({"x.wav": wav}))
        add("top/link.wav", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("top/hard.wav", kind=tarfile.LNKTYPE, link="top/ok.wav")
        add("top/fifo.wav", kind=tarfile.FIFOTYPE)
        add("top/device.wav", kind=tarfile.CHRTYPE)
        add("etc", kind=tarfile.SYMTYPE, link="/etc")
        add("etc/through-link.wav", de)  # a name below the link: still only the archive's bytes
        add("top/new\nline.wav", wav)
        add("top/notes.txt", b"not audio")
        add("top/folder/", kind=tarfile.DIRTYPE)
    zip_path = base / "bundle.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        for name, data in (("ok.flac", audio_bytes(flac_x, fmt="FLAC")), ("..\\win\\escape.wav", de),
                           ("a/../../up.wav", de), ("inner.tar", tar_bytes({"x.wav": wav})), ("empty.wav", b"")):
            z.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data)
        link = zipfile.ZipInfo("link.wav", date_time=(2024, 1, 1, 0, 0, 0))
        link.create_system, link.external_attr = 3, 0o120777 << 16
        z.writestr(link, "/etc/passwd")
        z.writestr(zipfile.ZipInfo("folder/", date_time=(2024, 1, 1, 0, 0, 0)), b"")
    # a member whose header declares 3 GiB: refused by size, then the archive ends where the body should be
    big = tarfile.TarInfo("big.wav")
    big.size = 3 << 30
    huge = base / "huge-member.tar"
    huge.write_bytes(big.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024)
    two = tar_bytes({"first.wav": wav, "second.wav": de})
    second_data = 512 + -(-len(wav) // 512) * 512 + 512  # header, padded body, header
    cut = base / "cut.tar"
    cut.write_bytes(two[: second_data + len(de) // 2])  # stops inside the second member

    link_error, nested = Case("error", "link"), Case("error", "nested archive")
    en_ok, de_ok = Case("ok", language="en", twin=en_x), Case("ok", language="de", twin=de_x)
    not_audio, not_regular = Case("error", "not a readable audio file"), Case("error", "not a regular file")
    return {
        f"{tar}::top/ok.wav": en_ok, f"{tar}::../escape.wav": de_ok,
        f"{tar}::/etc/absolute.wav": de_ok, f"{tar}::top/inner.zip": nested,
        f"{tar}::top/inner.tar.gz": nested, f"{tar}::top/zip-named.wav": not_audio,
        f"{tar}::top/link.wav": link_error, f"{tar}::top/hard.wav": link_error, f"{tar}::top/fifo.wav": not_regular,
        f"{tar}::top/device.wav": not_regular, f"{tar}::etc": link_error,
        f"{tar}::etc/through-link.wav": de_ok, f"{tar}::top/new\nline.wav": en_ok,
        f"{tar}::top/notes.txt": not_audio,
        f"{zip_path}::ok.flac": Case("ok", language="en", twin=(flac_x, RATE)),
        f"{zip_path}::..\\win\\escape.wav": de_ok, f"{zip_path}::a/../../up.wav": de_ok,
        f"{zip_path}::inner.tar": nested, f"{zip_path}::empty.wav": not_audio, f"{zip_path}::link.wav": link_error,
        f"{huge}::big.wav": Case("error", "larger than 2 gib"), f"{huge}::": Case("error", "unreadable archive"),
        f"{cut}::first.wav": en_ok, f"{cut}::": Case("error", "unreadable archive"),
    }


@dataclass
class Corpus:
    base: Path  # the test's folder: the corpus, the jobs' outputs
    root: Path  # the corpus
    cases: dict  # path under root -> Case: the inputs of both jobs
    members: dict  # archive member key -> Case: the label job's too (preprocessing reads no archives)
    readable: bool  # whether a chmod 000 file can still be read (as root)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    root = base / "corpus"
    cases, readable = build_corpus(root)
    members = build_archives(root / "archives", (root / "en" / "UPPER CASE.WAV").read_bytes())
    yield Corpus(base, root, cases, members, readable)
    (root / "en" / "hour-long.wav").unlink()  # 57.6 MB: not kept among pytest's last three temporary folders


def run_job(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """A job through its real entry point, joining the test's Ray; the timeout is the hang detector."""
    r = subprocess.run([sys.executable, str(REPO / "jobs" / script), *args, "--address", gcs_address(), "--quiet"],
                       cwd=cwd, env=job_env(), capture_output=True, timeout=HANG_GUARD)
    stderr = r.stderr.decode(errors="replace")
    assert r.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return r


def store_key(path: Path) -> str:
    """How the store spells a path: bytes that are not UTF-8 as \\xNN."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_reason(key: str, reason: str, case: Case) -> None:
    assert reason and "\n" not in reason and "\r" not in reason, (key, reason)
    assert "Traceback" not in reason and len(reason) < 300, (key, reason)
    assert case.reason in reason.lower(), (key, reason, case.reason)


def read_labels(path: Path) -> pd.DataFrame:
    """Names that are not UTF-8 come back with surrogate escapes (object: pandas' Arrow strings refuse them)."""
    return pd.read_csv(path, dtype=object, keep_default_na=False, encoding_errors="surrogateescape")


@pytest.fixture(scope="module")
def preprocessed(ray_local, corpus):
    r = run_job("preprocess.py", "--input", str(corpus.root), "--output", "store", "--format", "folders",
                "--max-seconds", str(MAX_SECONDS), "--window-seconds", str(FEATURES.window_seconds),
                "--n-mels", str(FEATURES.n_mels), cwd=corpus.base)
    return corpus.base / "store", r


@pytest.fixture(scope="module")
def labelled(model_dir, corpus):
    """The label job over a glob of the whole corpus, archives included (--all-files: every file gets a row)."""
    base, root = corpus.base, corpus.root
    out = base / "labels"
    out.mkdir()
    before = tree_snapshot(base, exclude=(out,))
    passwd = os.stat("/etc/passwd").st_mtime_ns
    r = run_job("label.py", "--model", str(model_dir), "--input", f"{root}/**/*", "--all-files", "--output",
                str(out / "labels.csv"), "--max-seconds", str(MAX_SECONDS), cwd=root / "archives")
    outside = (before == tree_snapshot(base, exclude=(out,)), os.stat("/etc/passwd").st_mtime_ns == passwd,
               sorted(p.name for p in out.iterdir()))
    return out / "labels.csv", r, outside


# ---------------------------------------------------------------- preprocess

def test_preprocess_one_record_per_bad_input(corpus, preprocessed):
    root, cases = corpus.root, corpus.cases
    store, r = preprocessed
    windows = pd.read_parquet(store / WINDOWS)
    errors = pd.read_parquet(store / ERRORS)
    expected = {store_key(root / rel): case for rel, case in cases.items()}
    assert len(cases) >= 40
    # exactly one record per input: windows or one error row, never both, never neither, nothing else
    assert not errors.path.duplicated().any()
    assert set(windows.path).isdisjoint(errors.path)
    assert set(windows.path) | set(errors.path) == set(expected), set(windows.path) ^ set(errors.path) ^ set(expected)
    assert f"{len(expected)} files" in r.stdout.decode()
    reasons = dict(zip(errors.path, errors.error))
    for key, case in expected.items():
        if case.expect == "error":
            assert key in reasons, (key, "has windows, expected an error")
            check_reason(key, reasons[key], case)
            continue
        assert key not in reasons, (key, reasons.get(key))
        rows = windows[windows.path == key]
        flags = set(",".join(rows.quality_flags).split(",")) - {""}
        assert set(case.flags) <= flags, (key, flags)
        assert (rows.source_sample_rate == case.rate).all() and (rows.source_channels == case.channels).all(), key
        assert rows.window_index.tolist() == list(range(len(rows)))
    # the features of every window are finite, in [0, 1] and of the configured shape (the huge floats too)
    assert (windows.n_mels == FEATURES.n_mels).all() and (windows.n_frames == FEATURES.window_frames).all()
    logmel = np.stack(windows.logmel.to_numpy())
    assert logmel.shape == (len(windows), FEATURES.n_mels * FEATURES.window_frames) and np.isfinite(logmel).all()
    assert logmel.min() >= 0 and logmel.max() <= 1
    assert set(windows.language) == {"en", "de"}  # from the folders, whatever the names


def test_preprocess_rerun_adds_nothing(corpus, preprocessed):
    """The store spells odd names its own way: a rerun must still find every file done (no second record)."""
    from langid.preprocess import run_preprocess

    store, _ = preprocessed
    before = sorted((p.name, p.stat().st_mtime_ns) for p in store.glob("*/*.parquet"))
    res = run_preprocess(str(corpus.root), str(store), FEATURES, "folders", max_seconds=MAX_SECONDS, progress=False)
    n = len(corpus.cases)
    assert (res.files_seen, res.skipped_done, res.ok, res.failed) == (n, n, 0, 0)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in store.glob("*/*.parquet")) == before


# ---------------------------------------------------------------- label

def label_cases(corpus: Corpus) -> dict:
    """What the label job over the whole corpus (--all-files, archives included) must give: {row key: Case}."""
    expected = {str(corpus.root / rel): case for rel, case in corpus.cases.items()}
    expected[str(corpus.root / "en" / "notes.txt")] = Case("error", "not a readable audio file")  # --all-files
    expected.update(corpus.members)
    return expected


def test_label_one_row_per_bad_input(corpus, labelled, model_dir):
    import langid

    out, r, _ = labelled
    ident = langid.load_model(str(model_dir), "cpu")
    df = read_labels(out)
    expected = label_cases(corpus)
    assert not df.path.duplicated().any()
    assert set(df.path) == set(expected), set(df.path) ^ set(expected)
    errors = sum(c.expect == "error" for c in expected.values())
    assert f"{len(expected)} files" in r.stdout.decode() and f"{errors} errors" in r.stdout.decode(), r.stdout
    for row in df.itertuples():
        case = expected[row.path]
        assert row.status == case.expect, (row.path, row.status, row.error)
        if case.expect == "error":
            check_reason(row.path, row.error, case)
            assert row.language == "" and row.confidence == ""
        elif case.language == "unknown":
            assert (row.language, row.error, row.windows_used) == ("unknown", "no speech found", "0"), row
        else:
            assert row.language in ("en", "de") and 0.5 <= float(row.confidence) <= 1, row
            if case.language:  # odd but good, and archive members under hostile names: the right answer, sure
                assert row.language == case.language and float(row.confidence) > 0.9, row
                # ...as sure as the same model on the audio the file was made from (codecs, rates, channels and
                # names change nothing; lossy µ-law and MP3 next to nothing), whatever that model's margin
                twin = ident.predict(case.twin[0], sample_rate=case.twin[1])
                assert twin.language == row.language and abs(float(row.confidence) - twin.confidence) < 2e-3, \
                    (row, twin.confidence)
    assert out.read_bytes().count(b"caf\xe9 \xff.wav") == 1  # the name's own bytes, as on disk


@pytest.mark.slow
def test_whisper_label_one_row_per_bad_input(ray_local, corpus):
    """The same corpus labelled by whisper:base: the same one row per input, the same errors and reasons (decoding
    is the model's business no more than naming is), silence 'unknown'. The tones are no speech, so their
    languages are not checked; but the same audio under every hostile name and in every archive gets one answer."""
    from langid.inference import describe_model

    out = corpus.base / "whisper-labels"
    out.mkdir()
    r = run_job("label.py", "--model", "whisper:base", "--input", f"{corpus.root}/**/*", "--all-files", "--output",
                str(out / "labels.csv"), "--max-seconds", str(MAX_SECONDS), cwd=corpus.root / "archives")
    assert sorted(p.name for p in out.iterdir()) == ["labels.csv"]
    df = read_labels(out / "labels.csv")
    expected = label_cases(corpus)
    assert not df.path.duplicated().any()
    assert set(df.path) == set(expected), set(df.path) ^ set(expected)
    errors = sum(c.expect == "error" for c in expected.values())
    assert f"{len(expected)} files" in r.stdout.decode() and f"{errors} errors" in r.stdout.decode(), r.stdout
    languages = set(describe_model("whisper:base")["labels"])
    # the English tone's WAV bytes under many names and in archives, and its FLAC bytes under two: one answer each
    # (not one for both: libsndfile scales floats to 16 bits by 32767 for WAV, by 32768 for FLAC; one step of
    # difference in half the samples moves Whisper's answer on a tone in the third decimal)
    copies = {}
    kinds = {(corpus.root / "en" / "UPPER CASE.WAV").read_bytes(): "wav",
             (corpus.root / "en" / "flac-named.wav").read_bytes(): "flac"}
    for rel, case in corpus.cases.items():
        path = corpus.root / rel
        if case.expect == "ok" and path.is_file() and not path.is_symlink() and os.access(path, os.R_OK):
            if path.read_bytes() in kinds:
                copies[str(path)] = kinds[path.read_bytes()]
    en_member = next(c for key, c in corpus.members.items() if key.endswith("::top/ok.wav"))
    copies.update({key: "wav" for key, c in corpus.members.items() if c is en_member})
    answers = {"wav": set(), "flac": set()}
    for row in df.itertuples():
        case = expected[row.path]
        assert row.status == case.expect, (row.path, row.status, row.error)
        if case.expect == "error":
            check_reason(row.path, row.error, case)
            assert row.language == "" and row.confidence == "" and row.windows_used == "0", row
        elif case.language == "unknown":
            assert (row.language, row.error, row.windows_used) == ("unknown", "no speech found", "0"), row
        else:
            assert row.language in languages and 0 < float(row.confidence) <= 1 and row.error == "", row
            assert row.windows == row.windows_used == "1", row  # every good file is shorter than Whisper's 10 s
            if row.path in copies:
                answers[copies[row.path]].add((row.language, row.confidence, row.top_languages))
    assert sum(kind == "wav" for kind in copies.values()) >= 10 and sum(kind == "flac" for kind in copies.values()) == 2
    assert len(answers["wav"]) == len(answers["flac"]) == 1, answers
    assert (out / "labels.csv").read_bytes().count(b"caf\xe9 \xff.wav") == 1


def test_label_archive_members_stay_inside(corpus, labelled):
    """Members named ../x, /etc/x, below a link, or links themselves: labels only, nothing written or read
    outside the archive (the working directory was the archives' folder)."""
    nothing_changed, passwd_untouched, outputs = labelled[2]
    assert nothing_changed and passwd_untouched and outputs == ["labels.csv"]
    assert not os.path.exists("/etc/absolute.wav") and not os.path.exists("/etc/through-link.wav")


def test_directory_input_lists_each_file_once(corpus):
    """The label job's directory walk over the same corpus: every input once, links to folders not followed."""
    from langid.inputs import list_inputs

    paths, kind = list_inputs(str(corpus.root))
    assert kind == "directory" and sorted(paths) == sorted(str(corpus.root / rel) for rel in corpus.cases)


# ---------------------------------------------------------------- single promises

def test_unreadable_file_gets_an_error_row(corpus, preprocessed):
    if corpus.readable:
        pytest.skip("running as root: chmod 000 does not stop reads, so there is no unreadable file to test")
    store, _ = preprocessed
    errors = pd.read_parquet(store / ERRORS)
    assert "permission" in errors[errors.path == str(corpus.root / "en" / "locked.wav")].error.iloc[0].lower()


def test_mp3_kinds_are_in_the_corpus(corpus):
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile cannot write MP3, so the corpus has no (truncated) MP3 files")
    assert {"en/good.mp3", "en/cut-half.mp3", "en/cut-tiny.mp3"} <= set(corpus.cases)


def test_hour_long_file_is_refused_in_bounded_memory(corpus):
    """Decoding reads blocks and stops at the limit: memory follows the limit, not the file (115 MB as float32)."""
    path = str(corpus.root / "en" / "hour-long.wav")
    assert os.path.getsize(path) > 57_000_000
    tracemalloc.start()
    try:
        with pytest.raises(AudioError, match="longer than the limit of 60 s"):
            decode(path, max_seconds=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # one minute at 8 kHz is 1.9 MB of float32


def test_glob_input_does_not_follow_folder_loops(tmp_path):
    """Two links back to a parent folder: `glob.glob` would list each file 2**40 times (it hung); now once."""
    from langid.inputs import list_inputs

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.wav").write_bytes(b"")
    (tmp_path / "a" / "top.flac").write_bytes(b"")
    os.symlink("..", tmp_path / "a" / "b" / "up")
    os.symlink("../..", tmp_path / "a" / "b" / "up2")
    t0 = time.monotonic()
    for spec in (f"{tmp_path}/**/*.wav", f"{tmp_path}/a/**", f"{tmp_path}/a/*/*.wav"):
        paths, kind = list_inputs(spec)
        assert kind == "glob" and len(paths) == len(set(paths))
        assert all("/up" not in p for p in paths), paths
    assert list_inputs(f"{tmp_path}/**/*.wav")[0] == [str(tmp_path / "a" / "b" / "x.wav")]
    assert list_inputs(f"{tmp_path}/a/**")[0] == [str(tmp_path / "a" / "b" / "x.wav"), str(tmp_path / "a" / "top.flac")]
    assert time.monotonic() - t0 < 60  # a hang detector, not a speed check


# ---------------------------------------------------------------- hostile model folders and metadata

class _Trap:
    """Unpickling this creates a marker folder: proof that something unpickled the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _cli_error(capsys, *argv) -> str:
    """`langid <job> ...` in this process (what jobs/<job>.py runs): exit status 2 and exactly one line."""
    from langid.cli import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and not RAY_LOG.match(x)]
    assert len(lines) == 1 and lines[0].startswith(f"langid {argv[0]}: error:") and "Traceback" not in err, err
    return lines[0]


def _label_error(capsys, model: Path, tmp_path: Path) -> str:
    (tmp_path / "in").mkdir(exist_ok=True)
    sf.write(str(tmp_path / "in" / "a.wav"), voice("en", 2.0, 1), RATE)
    line = _cli_error(capsys, "label", "--model", str(model), "--input", str(tmp_path / "in"), "--output",
                      str(tmp_path / "out.csv"), "--quiet")
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out.csv.partial").exists()
    return line


def test_pickles_in_a_model_folder_are_never_unpickled(model_dir, tmp_path, capsys):
    """The label job refuses a folder whose weights are a pickle, or a pickle named model.safetensors, with one
    line before it starts (its actors used to die loading it: a traceback), and so is a folder holding a pickle
    beside real weights. In no case is a pickle unpickled."""
    import langid

    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Trap(str(marker)))
    only = tmp_path / "pickled-model"
    shutil.copytree(model_dir, only)
    (only / "model.safetensors").unlink()
    for name in ("model.pt", "model.pth", "model.pkl", "model.bin"):
        (only / name).write_bytes(payload)
    line = _label_error(capsys, only, tmp_path)
    assert "model.safetensors" in line and "model.pt" in line and "pickle" in line
    for name in ("model.pt", "model.pth", "model.pkl", "model.bin"):
        (only / name).unlink()
    (only / "model.safetensors").write_bytes(payload)  # disguised
    assert "weights do not fit the metadata" in _label_error(capsys, only, tmp_path)
    assert not marker.exists()

    beside = tmp_path / "model-and-pickle"
    shutil.copytree(model_dir, beside)
    (beside / "export.PKL").write_bytes(payload)
    line = _label_error(capsys, beside, tmp_path)
    assert "export.PKL" in line and "never loaded" in line
    with pytest.raises(ModelError, match="pickled files are never loaded"):
        langid.load_model(str(beside), "cpu")
    (beside / "export.PKL").unlink()  # without it, the same folder loads
    p = langid.load_model(str(beside), "cpu").predict(str(tmp_path / "in" / "a.wav"))
    assert (p.status, p.language) == ("ok", "en")
    assert not marker.exists()


def _meta(model_dir: Path) -> dict:
    return json.loads((model_dir / "model.json").read_text())


# (how model.json is spoiled, words of the refusal); what tests/test_training.py checks already is not repeated
BAD_METADATA = [
    (lambda m: m.pop("feature_config"), "bad feature_config (feature config must be a JSON object"),
    (lambda m: m["feature_config"].pop("n_mels"), "missing feature-config keys: ['n_mels']"),
    (lambda m: m.pop("labels"), "'labels' must be"),
    (lambda m: m.pop("architecture"), "unknown architecture"),
    (lambda m: m.pop("format_version"), "format_version"),
    (lambda m: m.update(feature_config=None), "must be a JSON object"),
    (lambda m: m.update(feature_config=[16000, 10]), "must be a JSON object"),
    (lambda m: m.update(feature_config=0), "must be a JSON object"),
    (lambda m: m.update(labels={"en": 0, "de": 1}), "'labels' must be"),
    (lambda m: m.update(labels=[f"l{i}" for i in range(20_000)]), "at most 10000"),
    (lambda m: m.update(format_version="1"), "format_version"),
    (lambda m: m["feature_config"].update(n_fft=10 ** 9), "n_fft and hop_length <= 65536"),
    (lambda m: m["feature_config"].update(sample_rate=10 ** 12, fmax=8000.0), "sample_rate <= 384000"),
    (lambda m: m["feature_config"].update(window_seconds=1e9), "one window would hold"),
    (lambda m: m["feature_config"].update(hop_length=1, window_seconds=3600.0), "one window would hold"),
    (lambda m: m["feature_config"].update(n_mels=10 ** 400), "out of range"),
    (lambda m: m["feature_config"].update(top_db=-80.0), "top_db"),
    (lambda m: m.update(calibration=[1.5]), "'calibration' must be"),
    (lambda m: m.update(calibration={"temperature": "1.2"}), "'calibration' must be"),
    (lambda m: m.update(calibration={"temperature": 0}), "'calibration' must be"),
    (lambda m: m.update(calibration={"temperature": -1.17}), "'calibration' must be"),
    (lambda m: m.update(calibration={"temperature": True}), "'calibration' must be"),
]


@pytest.mark.parametrize("spoil, words", BAD_METADATA, ids=range(len(BAD_METADATA)))
def test_model_metadata_is_validated_before_use(model_dir, tmp_path, spoil, words):
    from langid.artifact import ModelError, load_network

    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    meta = _meta(folder)
    spoil(meta)
    (folder / "model.json").write_text(json.dumps(meta))
    t0 = time.monotonic()
    with pytest.raises(ModelError) as ei:
        load_network(str(folder))
    assert words in str(ei.value) and "\n" not in str(ei.value) and len(str(ei.value)) < 400
    assert time.monotonic() - t0 < 30  # refused before anything is built from the values


@pytest.mark.parametrize("text", [b"", b"\x89PNG\r\n\x1a\n\x00\x00", b'{"labels": ["en", "de"]', b"\xff\xfe{}", b"null",
                                  b'{"feature_config": {"window_seconds": NaN}}'])
def test_model_metadata_that_is_not_json(model_dir, tmp_path, text):
    from langid.artifact import ModelError, load_network

    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    (folder / "model.json").write_bytes(text)
    with pytest.raises(ModelError) as ei:
        load_network(str(folder))
    assert "\n" not in str(ei.value) and "model.json" in str(ei.value)


def test_bad_model_folders_through_the_label_job(model_dir, tmp_path, capsys):
    """Refused with one line before any work: metadata with a huge value, weights of another architecture or
    for another number of labels (which its actors used to find only by dying)."""
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    meta = _meta(folder)
    for change, words in (({"feature_config": {**meta["feature_config"], "n_fft": 10 ** 9}}, "n_fft"),
                          ({"architecture": "resnet34"}, "weights do not fit the metadata (for resnet34"),
                          ({"labels": ["de", "en", "es"]}, "weights do not fit the metadata (for resnet18 with 3")):
        (folder / "model.json").write_text(json.dumps({**meta, **change}))
        line = _label_error(capsys, folder, tmp_path)
        assert "model" in line and words in line, line


@pytest.mark.parametrize("text, words", [
    (b"", "bad feature configuration"),
    (b"{not json", "bad feature configuration"),
    (b"[64, 400]", "must be a JSON object"),
    (b"42", "must be a JSON object"),
    (b'{"n_mels": 64}', "missing feature-config keys"),
    (json.dumps({**TONE_CFG.to_dict(), "n_fft": 10 ** 9}).encode(), "n_fft and hop_length"),
    (json.dumps({**TONE_CFG.to_dict(), "window_seconds": 10 ** 400}).encode(), "out of range"),
    (json.dumps({**TONE_CFG.to_dict(), "hop_length": "160"}).encode(), "must be a number"),
])
def test_store_feature_config_is_validated_before_use(tmp_path, text, words):
    """A store's feature_config.json is read by preprocess (resume), train and evaluate: one clear refusal."""
    from langid.store import CONFIG_FILE, Store, StoreError

    (tmp_path / "store").mkdir()
    (tmp_path / "store" / CONFIG_FILE).write_bytes(text)
    for use in (lambda s: s.read_config(), lambda s: s.init(TONE_CFG)):
        with pytest.raises(StoreError) as ei:
            use(Store(str(tmp_path / "store")))
        msg = str(ei.value)
        assert words in msg and CONFIG_FILE in msg and "\n" not in msg and len(msg) < 400, msg
    assert (tmp_path / "store" / CONFIG_FILE).read_bytes() == text  # refused, not overwritten


def test_store_feature_config_through_the_preprocess_job(ray_local, tmp_path, capsys):
    from langid.store import CONFIG_FILE

    (tmp_path / "in" / "en").mkdir(parents=True)
    sf.write(str(tmp_path / "in" / "en" / "a.wav"), voice("en", 1.0), RATE)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / CONFIG_FILE).write_text("[1, 2]")
    line = _cli_error(capsys, "preprocess", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "store"),
                      "--quiet")
    assert CONFIG_FILE in line and "must be a JSON object" in line
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [CONFIG_FILE]
