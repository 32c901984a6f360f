"""The bulk-labeling job end to end on a real local Ray, with the tiny tone model of conftest.py.

"en" is a low tone (~300 Hz), "de" a high one (~2500 Hz): a model that separates them answers every
question below with certainty, so rows, languages, segments and confidences can all be checked exactly.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

import langid
from conftest import REPO, TONE_CFG as CFG, kaggle_name, voice, write_wav
from langid.labeling import (BASE_COLUMNS, PARTIAL, LabelOptions, answer_rows, csv_columns, result_schema,
                             run_label, write_parquet)

RATE = CFG.sample_rate
RAY_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING)\s")

pytestmark = pytest.mark.slow


def read_rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_pd(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def label(model, inp, out, **kw) -> "langid.labeling.LabelResult":
    kw.setdefault("progress", False)
    return run_label(str(model), str(inp), str(out), **kw)


def one_row_per(rows: list[dict], keys) -> dict:
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), [p for p in paths if paths.count(p) > 1]
    assert set(paths) == set(keys), (set(paths) ^ set(keys))
    return {r["path"]: r for r in rows}


def job_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def gcs_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def tree_snapshot(root: Path, exclude: tuple = ()) -> dict:
    out = {}
    for p in root.rglob("*"):
        if any(p == e or e in p.parents for e in exclude):
            continue
        st_ = p.lstat()
        out[str(p)] = (st_.st_size, st_.st_mtime_ns)
    return out


# ---------------------------------------------------------------- inputs

def write_flac_bytes(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def write_wav_bytes(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# relative path -> expected language (None: an error row)
MESSY = {
    kaggle_name("en", 1): "en",
    f"train/train/{kaggle_name('de', 2)}": "de",
    f"a/b/c/{kaggle_name('en', 3)}": "en",
    "a/b/with space.wav": "de",
    "a/quote\"s and 'single'.flac": "en",
    "commas,in,name.wav": "de",
    "ünïcødé/日本語 音声.flac": "en",
    "new\nline.wav": "de",
    " lead and trail .WAV": "en",
    "semi;colon#hash%20.flac": "de",
    "broken/empty.wav": None,
    "broken/text.wav": None,
    "broken/deep/truncated.flac": None,
}


def build_messy(root: Path) -> dict:
    """The MESSY tree under root; returns {path as the job lists it: expected language or None}."""
    for i, (rel, lang) in enumerate(MESSY.items()):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if lang is not None:
            x = voice(lang, 2.0 + (i % 3) * 0.5, seed=i)
            p.write_bytes(write_flac_bytes(x) if rel.lower().endswith(".flac") else write_wav_bytes(x))
    (root / "broken" / "empty.wav").write_bytes(b"")
    (root / "broken" / "text.wav").write_text("this is not audio at all\n" * 20)
    good = write_flac_bytes(voice("en", 2.0))
    (root / "broken" / "deep" / "truncated.flac").write_bytes(good[: len(good) // 2])
    (root / "a" / "notes.txt").write_text("not an input")  # not audio: not listed
    return {os.path.join(root.name, rel): lang for rel, lang in MESSY.items()}


@pytest.fixture(scope="module")
def cli_run(model_dir, tmp_path_factory):
    """`python jobs/label.py` once, from another folder, relative paths, joining the test cluster."""
    work = tmp_path_factory.mktemp("cli")
    expected = build_messy(work / "messy")
    args = ["--model", os.path.relpath(model_dir, work), "--input", "messy", "--output", "labels.csv",
            "--parquet", "labels.parquet", "--segments", "segments.csv", "--address", gcs_address(), "--quiet"]
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "label.py"), *args], cwd=work, env=job_env(),
                       capture_output=True, text=True, timeout=300)
    return work, expected, r


@pytest.fixture(scope="module")
def small(model_dir, tmp_path_factory):
    """Clear en/de files, a half-en half-de file, a silent one and a broken one; labelled once (default flags)."""
    d = tmp_path_factory.mktemp("small")
    files = {"in/en1.flac": voice("en", 3.0, 1), "in/en2.wav": voice("en", 2.0, 2),
             "in/de1.flac": voice("de", 3.0, 3), "in/sub/de2.wav": voice("de", 2.5, 4),
             "in/mixed.flac": np.concatenate([voice("en", 2.0, 5), voice("de", 2.0, 6)]),
             "in/silent.wav": np.zeros(2 * RATE, np.float32)}
    for rel, x in files.items():
        write_wav(d / rel, x, RATE)
    (d / "in" / "broken.wav").write_bytes(b"RIFF\x00\x00")
    paths = sorted(str(d / rel) for rel in files) + [str(d / "in" / "broken.wav")]
    res = label(model_dir, d / "in", d / "labels.csv", opts=LabelOptions(probabilities=True))
    return d, paths, res


# ---------------------------------------------------------------- 1. one row per input file

def test_one_row_per_file_cli(cli_run):
    work, expected, r = cli_run
    assert r.returncode == 0, r.stderr[-3000:]  # 0 although three rows are errors
    assert "3 errors" in r.stdout and "13 files" in r.stdout, r.stdout
    assert not (work / f"labels.csv{PARTIAL}").exists() and not (work / "labels.csv.tmp").exists()

    rows = read_rows(work / "labels.csv")
    with open(work / "labels.csv", newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == BASE_COLUMNS + ["p_de", "p_en"]  # --parquet adds the probabilities
    by_path = one_row_per(rows, expected)
    df = read_pd(work / "labels.csv")
    assert len(df) == len(expected) and set(df.path) == set(expected) and not df.path.duplicated().any()
    for key, lang in expected.items():
        row = by_path[key]
        if lang is None:
            assert row["status"] == "error" and row["error"].strip(), (key, row)
            assert row["language"] == "" and row["confidence"] == ""
        else:
            # relative paths worked in the workers, whose working directory is the cluster's, not ours
            assert row["status"] == "ok", (key, row)
            assert row["language"] == lang, (key, row)
            assert float(row["confidence"]) > 0.99 and row["error"] == ""
            assert abs(float(row["p_de"]) + float(row["p_en"]) - 1) < 1e-4
    assert "empty" in by_path["messy/broken/empty.wav"]["error"]
    assert "not a readable audio file" in by_path["messy/broken/text.wav"]["error"]
    # pandas agrees with the csv module row by row
    assert df.to_dict("records") == rows


def test_missing_model_is_one_line_error(tmp_path):
    (tmp_path / "in").mkdir()
    write_wav(tmp_path / "in" / "a.wav", voice("en", 1.0), RATE)
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "label.py"), "--model", str(tmp_path / "no-model"),
                        "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out.csv"), "--quiet"],
                       env=job_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.strip() and not RAY_LOG.match(x)]
    assert len(lines) == 1 and lines[0].startswith("langid label: error:"), r.stderr
    assert "no-model" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / f"out.csv{PARTIAL}").exists()


# ---------------------------------------------------------------- 2. archives

def _add_tar_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def build_archives(base: Path) -> tuple[list[Path], dict]:
    """A .tar, .tar.gz and .zip of nested members and hostile ones; ({key: language, None or 'link'})."""
    members = {  # name -> (bytes, expected)
        f"top/{kaggle_name('en', 11)}": (write_flac_bytes(voice("en", 2.0, 11)), "en"),
        f"top/deep/er/{kaggle_name('de', 12)}": (write_flac_bytes(voice("de", 2.0, 12)), "de"),
        "top/odd name, \"quoted\" ü.wav": (write_wav_bytes(voice("en", 1.5, 13)), "en"),
        "top/empty.wav": (b"", None),
        "top/text.wav": (b"plain text, not audio\n" * 10, None),
        "../evil.wav": (write_wav_bytes(voice("de", 2.0, 14)), "de"),
        "/abs/evil.wav": (write_wav_bytes(voice("de", 2.0, 15)), "de"),
    }
    good = write_flac_bytes(voice("en", 2.0))
    members["top/truncated.flac"] = (good[: len(good) // 2], None)
    archives, expected = [], {}
    for suffix, mode in ((".tar", "w"), (".tar.gz", "w:gz")):
        path = base / f"bundle{suffix}"
        with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:
            for name, (data, _) in members.items():
                _add_tar_bytes(tar, name, data)
            link = tarfile.TarInfo("top/passwd.wav")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
            hard = tarfile.TarInfo("top/hard.wav")
            hard.type, hard.linkname = tarfile.LNKTYPE, f"top/{kaggle_name('en', 11)}"
            tar.addfile(hard)
            tar.addfile(tarfile.TarInfo("top/notes.txt"), io.BytesIO(b""))  # not audio: no row
        with tarfile.open(path) as tar:  # the names really are stored as given
            names = set(tar.getnames())
        assert {"../evil.wav", "/abs/evil.wav", "top/passwd.wav", "top/hard.wav"} <= names
        archives.append(path)
    path = base / "bundle.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, (data, _) in members.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            z.writestr(info, data)
        link = zipfile.ZipInfo("top/passwd.wav", date_time=(2024, 1, 1, 0, 0, 0))
        link.external_attr = (0o120777 << 16)
        link.create_system = 3
        z.writestr(link, "/etc/passwd")
        z.writestr("top/notes.txt", "not audio")
    archives.append(path)
    for a in archives:
        if a.suffix == ".zip":
            with zipfile.ZipFile(a) as z:
                names = [i.filename for i in z.infolist() if not i.filename.endswith(".txt")]
        else:
            with tarfile.open(a) as tar:
                names = [m.name for m in tar.getmembers() if not m.name.endswith(".txt")]
        for name in names:
            exp = members[name][1] if name in members else "link"
            expected[f"{a}::{name}"] = exp
    assert any(k.endswith("::/abs/evil.wav") for k in expected if k.startswith(str(path)))
    return archives, expected


def test_archives_one_row_per_member_and_nothing_written_outside(model_dir, tmp_path, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    archives, expected = build_archives(inputs)
    assert len(expected) == 3 * 10 - 1  # zip has no hard link
    # decoys where the hostile names point, relative to the archive folder and to the working directory:
    # an "en" tone, while the members hold "de" tones
    decoy = write_wav_bytes(voice("en", 2.0, 99))
    (tmp_path / "evil.wav").write_bytes(decoy)
    cwd = inputs / "cwd"
    cwd.mkdir()
    (inputs / "evil.wav").write_bytes(decoy)
    listing = inputs / "archives.txt"
    listing.write_text("".join(f"{a}\n" for a in archives))
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(cwd)
    passwd = os.stat("/etc/passwd")
    before = tree_snapshot(tmp_path, exclude=(out,))
    repo_before = {p.name for p in REPO.iterdir()} | {p.name for p in REPO.parent.iterdir()}
    assert not os.path.exists("/abs")

    res = label(model_dir, f"@{listing}", out / "labels.csv")

    assert tree_snapshot(tmp_path, exclude=(out,)) == before  # nothing extracted, nothing overwritten
    assert sorted(p.name for p in out.iterdir()) == ["labels.csv"]
    assert not os.path.exists("/abs") and os.stat("/etc/passwd").st_mtime_ns == passwd.st_mtime_ns
    assert not [n for n in ({p.name for p in REPO.iterdir()} | {p.name for p in REPO.parent.iterdir()}) - repo_before
                if "evil" in n or "passwd" in n]
    rows = read_rows(out / "labels.csv")
    by_key = one_row_per(rows, expected)
    assert res.total == len(expected) and res.labelled == len(expected)
    for key, exp in expected.items():
        row = by_key[key]
        if exp is None:
            assert row["status"] == "error" and row["error"].strip(), (key, row)
        elif exp == "link":
            assert row["status"] == "error" and "link" in row["error"], (key, row)
        else:  # '..' and absolute names are labels only: the bytes came from the archive ("de"), not the decoys
            assert (row["status"], row["language"]) == ("ok", exp), (key, row)
    assert read_pd(out / "labels.csv").path.tolist() == [r["path"] for r in rows]


def test_names_that_are_not_utf8(model_dir, tmp_path):
    """Linux names are bytes: one that is not UTF-8 gets its row (its bytes kept in the CSV), not a crash."""
    raw_dir = os.fsencode(tmp_path)
    bad = os.fsdecode(raw_dir + b"/caf\xe9 \xff.wav")  # Python's surrogate escapes for the two odd bytes
    Path(bad).write_bytes(write_wav_bytes(voice("en", 2.0, 1)))
    good = write_wav(tmp_path / "good.wav", voice("de", 2.0, 2), RATE)
    tar_path = tmp_path / "odd.tar"
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:  # the member name's bytes as they are
        _add_tar_bytes(tar, os.fsdecode(b"dir/na\xefve.flac"), write_flac_bytes(voice("de", 2.0, 3)))
    member_key = f"{tar_path}::" + os.fsdecode(b"dir/na\xefve.flac")
    (tmp_path / "list.txt").write_bytes(b"".join(os.fsencode(p) + b"\n" for p in (bad, str(good), str(tar_path))))
    out, parquet = tmp_path / "out" / "labels.csv", tmp_path / "out" / "labels.parquet"
    out.parent.mkdir()
    res = label(model_dir, f"@{tmp_path / 'list.txt'}", out, parquet=str(parquet),
                opts=LabelOptions(probabilities=True))
    assert (res.total, res.errors) == (3, 0)
    assert b"caf\xe9 \xff.wav" in out.read_bytes() and b"na\xefve.flac" in out.read_bytes()
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = one_row_per(list(csv.DictReader(f)), [bad, str(good), member_key])
    assert {k: (r["status"], r["language"]) for k, r in rows.items()} == {
        bad: ("ok", "en"), str(good): ("ok", "de"), member_key: ("ok", "de")}
    finished = out.read_bytes()
    with pytest.raises(ValueError, match="other columns"):  # other flags: refused, the finished CSV untouched
        label(model_dir, f"@{tmp_path / 'list.txt'}", out)
    assert out.read_bytes() == finished and not Path(str(out) + PARTIAL).exists()
    again = label(model_dir, f"@{tmp_path / 'list.txt'}", out, opts=LabelOptions(probabilities=True))
    assert (again.resumed, again.labelled) == (3, 0) and out.read_bytes() == finished
    df = pd.read_parquet(parquet)  # Parquet strings are UTF-8: the odd bytes are spelled out there
    assert sorted(df.path) == sorted([str(tmp_path / "caf\\xe9 \\xff.wav"), str(good),
                                      f"{tar_path}::dir/na\\xefve.flac"])


# ---------------------------------------------------------------- 3. options

def test_languages_min_confidence_and_silence(model_dir, small):
    d, paths, _ = small
    name = {os.path.basename(p): p for p in paths}
    ident = langid.load_model(str(model_dir), "cpu")
    api = {p.path: p for p in ident.predict_many(paths)}
    mixed, clear = api[name["mixed.flac"]].confidence, min(api[name[n]].confidence for n in
                                                           ("en1.flac", "en2.wav", "de1.flac", "de2.wav"))
    assert mixed < clear - 1e-3, (mixed, clear)  # half en, half de: the model hesitates
    threshold = (mixed + clear) / 2

    with pytest.raises(ValueError, match="xx"):
        label(model_dir, d / "in", d / "bad.csv", opts=LabelOptions(languages=["en", "xx"]))
    assert not (d / "bad.csv").exists()

    # --languages en: only the candidate appears, whatever the audio
    label(model_dir, d / "in", d / "only-en.csv", opts=LabelOptions(languages=["en"], probabilities=True))
    rows = one_row_per(read_rows(d / "only-en.csv"), paths)
    for p, row in rows.items():
        if p.endswith("broken.wav"):
            assert row["status"] == "error"
        elif p.endswith("silent.wav"):
            assert (row["status"], row["language"], row["error"]) == ("ok", "unknown", "no speech found")
            assert row["p_en"] == row["p_de"] == "" and row["top_languages"] == ""
        else:
            assert (row["status"], row["language"]) == ("ok", "en"), row
            assert float(row["confidence"]) == pytest.approx(1.0)
            assert row["p_de"] == "" and float(row["p_en"]) == pytest.approx(1.0)
            assert [t.split(":")[0] for t in row["top_languages"].split()] == ["en"]

    # --min-confidence between the hesitant file and the clear ones
    label(model_dir, d / "in", d / "gated.csv", opts=LabelOptions(min_confidence=threshold, probabilities=True))
    rows = one_row_per(read_rows(d / "gated.csv"), paths)
    for p, row in rows.items():
        base = os.path.basename(p)
        if base == "broken.wav":
            assert row["status"] == "error" and row["error"]
        elif base == "silent.wav":
            assert (row["status"], row["language"], row["error"]) == ("ok", "unknown", "no speech found")
            assert int(row["windows_used"]) == 0 and int(row["windows"]) == 2
        elif base == "mixed.flac":
            assert (row["status"], row["language"]) == ("ok", "unknown"), row
            assert float(row["confidence"]) < threshold
            assert {t.split(":")[0] for t in row["top_languages"].split()} == {"en", "de"}
        else:
            assert (row["status"], row["language"]) == ("ok", base[:2]), row
            assert float(row["confidence"]) >= threshold


# ---------------------------------------------------------------- 4. segments

@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_segments_of_a_two_language_file(model_dir, tmp_path, overlap):
    write_wav(tmp_path / "in" / "long.flac", np.concatenate([voice("en", 4.0, 1), voice("de", 4.0, 2)]), RATE)
    write_wav(tmp_path / "in" / "short.wav", voice("de", 2.0, 3), RATE)
    seg = tmp_path / "segments.csv"
    label(model_dir, tmp_path / "in", tmp_path / "labels.csv", opts=LabelOptions(overlap=overlap), segments=str(seg))
    long_key = str(tmp_path / "in" / "long.flac")
    rows = one_row_per(read_rows(tmp_path / "labels.csv"), [long_key, str(tmp_path / "in" / "short.wav")])
    assert int(rows[long_key]["windows"]) == (8 if overlap == 0 else 15)
    segs = read_rows(seg)
    assert list(segs[0]) == ["path", "start", "end", "language", "confidence"]
    mine = [s for s in segs if s["path"] == long_key]
    assert [s["language"] for s in mine] == ["en", "de"], mine
    (s1, e1), (s2, e2) = [(float(s["start"]), float(s["end"])) for s in mine]
    assert s1 == 0.0 and e2 == pytest.approx(8.0)
    tol = 1e-6 if overlap == 0 else 0.5 + 1e-6  # the straddling window may go either way
    assert abs(e1 - 4.0) <= tol and abs(s2 - 4.0) <= tol and s2 <= e1 + 1e-6
    assert [(float(s["start"]), float(s["end"]), s["language"]) for s in segs if s["path"] != long_key] == \
        [(0.0, 2.0, "de")]
    assert not Path(str(seg) + PARTIAL).exists()


# ---------------------------------------------------------------- 5. resume

def _corpus(d: Path, n: int, seconds: float) -> list[str]:
    paths = []
    for i in range(n):
        lang = "en" if i % 2 == 0 else "de"
        p = write_wav(d / f"part{i % 3}" / kaggle_name(lang, i), voice(lang, seconds, i), RATE)
        paths.append(str(p))
    return paths


def test_resume_after_a_cut_partial_file(model_dir, tmp_path):
    paths = _corpus(tmp_path / "in", 10, 2.0)
    odd = tmp_path / "in" / "odd\nname, \"q\".wav"
    write_wav(odd, voice("de", 2.0, 50), RATE)
    paths.append(str(odd))
    out = tmp_path / "labels.csv"
    first = label(model_dir, tmp_path / "in", out)
    assert first.total == 11 and first.correct == first.known == 10
    original = one_row_per(read_rows(out), paths)
    text = out.read_bytes()
    order = [r["path"] for r in read_rows(out)]

    def row_offsets(key: str) -> tuple[int, int]:
        start = text.index(('"' + key.replace('"', '""') + '"' if any(c in key for c in '",\n') else key)
                           .encode())
        return start, text.index(b"\r\n", start + len(key.encode())) + 2

    # (a) cut in the middle of an ordinary row; (b) cut just after the newline inside the quoted odd name
    plain_key = order[len(order) // 2] if order[len(order) // 2] != str(odd) else order[len(order) // 2 - 1]
    for what, cut_key in (("mid-row", plain_key), ("inside the quoted newline", str(odd))):
        s, e = row_offsets(cut_key)
        cut = s + (e - s) // 2 if what == "mid-row" else s + text[s:].index(b"\n") + 1
        partial = Path(str(out) + PARTIAL)
        partial.write_bytes(text[:cut])  # a killed run: its rows so far, the last one cut
        out.unlink()
        kept = order[:order.index(cut_key)]
        res = label(model_dir, tmp_path / "in", out)
        assert not partial.exists(), what
        rows = read_rows(out)
        by_path = one_row_per(rows, paths)
        assert (res.resumed, res.labelled, res.total) == (len(kept), 11 - len(kept), 11), what
        assert [r["path"] for r in rows][:len(kept)] == kept  # the rows before the cut are kept as they were
        for p in paths:  # the cut row and everything after it are labelled again, with the same answers
            assert by_path[p]["language"] == original[p]["language"], (what, p)
            assert float(by_path[p]["confidence"]) == pytest.approx(float(original[p]["confidence"]), abs=1e-5)
        assert read_pd(out).path.tolist() == [r["path"] for r in rows]
        text, order = out.read_bytes(), [r["path"] for r in rows]

    # a rerun on a finished CSV labels nothing
    again = label(model_dir, tmp_path / "in", out)
    assert (again.resumed, again.labelled, again.total) == (11, 0, 11)


def test_resume_after_kill(model_dir, tmp_path):
    paths = _corpus(tmp_path / "in", 40, 4.0)
    out = tmp_path / "labels.csv"
    partial = Path(str(out) + PARTIAL)
    cmd = [sys.executable, str(REPO / "jobs" / "label.py"), "--model", str(model_dir), "--input", str(tmp_path / "in"),
           "--output", str(out), "--batch-size", "2", "--address", gcs_address(), "--quiet"]
    log = open(tmp_path / "job.log", "w+")
    proc = subprocess.Popen(cmd, env=job_env(), start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    seen, deadline = 0, time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.exists():
                with open(partial, newline="", encoding="utf-8") as f:
                    seen = max(0, len(list(csv.reader(f))) - 1)
                if seen >= 3:
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    log.seek(0)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, log.read()[-2000:])
    assert 3 <= seen < 40
    assert not out.exists()  # killed mid-run: no final CSV, only the partial one
    assert partial.exists()
    with open(partial, newline="", encoding="utf-8") as f:
        partial_rows = list(csv.reader(f))
    assert 3 <= len(partial_rows) - 1 < 40

    res = label(model_dir, tmp_path / "in", out)
    rows = read_rows(out)
    by_path = one_row_per(rows, paths)
    assert res.total == 40 and res.resumed >= 3 and res.resumed + res.labelled == 40
    assert all(r["status"] == "ok" for r in rows)
    assert all(by_path[p]["language"] == os.path.basename(p)[:2] for p in paths)
    assert not partial.exists()


def test_leftover_temporaries_of_a_killed_run_are_removed(model_dir, tmp_path):
    """A writer killed between writing its hidden temporary file and renaming it leaves the file behind; the
    next run of the same job removes it, and touches nobody else's hidden files."""
    _corpus(tmp_path / "in", 2, 1.0)
    out = tmp_path / "labels.csv"
    leftovers = [tmp_path / ".labels.csv.partial.4242-0badf00d.tmp", tmp_path / ".labels.csv.17-cafe.tmp",
                 tmp_path / ".segments.csv.partial.9-beef.tmp", tmp_path / ".labels.parquet.5-feed.tmp"]
    others = [tmp_path / ".notes.tmp", tmp_path / ".labels.csv.backup"]
    for f in leftovers + others:
        f.write_text("half-written")
    res = label(model_dir, tmp_path / "in", out, segments=str(tmp_path / "segments.csv"),
                parquet=str(tmp_path / "labels.parquet"))
    assert (res.total, res.errors) == (2, 0)
    assert [f for f in leftovers if f.exists()] == []
    assert all(f.read_text() == "half-written" for f in others)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(f.name for f in others)


def test_stages_pass_columns_not_rows_or_json(model_dir, tmp_path, monkeypatch):
    """Decoded windows travel as one flat float32 list per file, answers as typed columns (probabilities a
    fixed-size list, the timeline a list of structs), and the driver receives exactly these batches; no stage and
    no CSV writing goes through JSON."""
    import langid.labeling as labeling
    from langid.audio import load_audio
    from langid.inference import describe_model, load_model
    from langid.timeline import merge_segments
    from langid.poison import Attempts

    paths = _corpus(tmp_path / "in", 3, 2.5)
    (tmp_path / "in" / "empty.wav").write_bytes(b"")
    meta = describe_model(str(model_dir))
    items = pa.Table.from_pylist([{"key": p, "path": p, "data": None, "error": None}
                                  for p in paths + [str(tmp_path / "in" / "empty.wav")]], schema=labeling.ITEM_SCHEMA)
    opts = LabelOptions(probabilities=True)

    def no_json(*args, **kwargs):
        raise AssertionError("JSON on the labeling path")

    predictor = labeling.Predictor(str(model_dir), opts)  # made before the ban: the model's metadata is JSON
    with monkeypatch.context() as m:
        m.setattr(json, "dumps", no_json)
        m.setattr(json, "loads", no_json)
        feats = labeling.featurize_batch(items, meta["feature_config"].to_dict(), 1.0, 3600.0, Attempts())
        answers = predictor(feats)
        rows = labeling.answer_rows(answers, opts)
        timeline = labeling.segment_rows(answers)
    assert feats.schema == labeling.FEATURE_SCHEMA and feats.schema.field("specs").type == pa.list_(pa.float32())
    ident = load_model(str(model_dir), "cpu")
    for i, p in enumerate(paths):  # a file's windows, laid end to end: exactly the API's features
        specs, starts, speech = ident.file_windows(load_audio(p, CFG.sample_rate))
        assert feats.column("n_windows")[i].as_py() == len(specs)
        np.testing.assert_array_equal(feats.column("specs")[i].values.to_numpy(), specs.ravel())
    assert feats.column("error")[3].as_py().startswith("empty file")
    assert answers.schema == labeling.result_schema(len(meta["labels"]))
    assert answers.schema.field("probabilities").type == pa.list_(pa.float64(), len(meta["labels"]))
    assert answers.schema.field("segments").type == pa.list_(labeling.SEGMENT_TYPE)
    api = ident.predict_many(paths)
    for row, pred in zip(rows, api):
        assert row[1] == pred.language and float(row[2]) == pytest.approx(pred.confidence, abs=1e-4)
        assert [s[3] for s in timeline[row[0]]] == [s.language for s in merge_segments(pred.segments)]
    assert rows[3][7:9] == ["error", "empty file (0 bytes)"]

    seen = []  # the whole job: the driver's batches are the actors' columns
    write = labeling.Outputs.write
    monkeypatch.setattr(labeling.Outputs, "write", lambda self, batch: seen.append(batch.schema) or write(self, batch))
    res = label(model_dir, tmp_path / "in", tmp_path / "labels.csv")
    assert res.total == 4 and seen and all(s == labeling.result_schema(len(meta["labels"])) for s in seen)


# ---------------------------------------------------------------- 6. API, CLI and job agree

def test_an_embedded_run_prints_its_bar_and_summary_only(model_dir, small, tmp_path):
    """As in the demo: the job starts its own Ray; the terminal gets the bar and the summary, none of Ray's
    start-up, worker, deprecation or core-worker lines."""
    d, paths, _ = small
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "label.py"), "--model", str(model_dir), "--input",
                        str(d / "in"), "--output", str(tmp_path / "labels.csv"), "--num-cpus", "2"],
                       env=job_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = r.stdout.splitlines()
    assert len(summary) == 1 and summary[0].startswith(f"{len(paths)} files in "), r.stdout
    bar = [line for line in re.split(r"[\r\n]+", r.stderr) if line.strip()]
    assert bar and all(line.startswith("label: ") for line in bar), r.stderr
    assert f"{len(paths)}/{len(paths)}" in bar[-1]


def test_api_cli_and_job_agree(model_dir, small):
    d, paths, res = small
    job = one_row_per(read_rows(d / "labels.csv"), paths)
    api = langid.load_model(str(model_dir), "cpu").predict_many(paths)
    r = subprocess.run([sys.executable, "-m", "langid.cli", "predict", "--json", "--model", str(model_dir),
                        "--device", "cpu", *paths], env=job_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    cli = json.loads(r.stdout)
    assert [c["path"] for c in cli] == [a.path for a in api] == paths
    for a, c in zip(api, cli):
        j = job[a.path]
        assert a.status == c["status"] == j["status"], (a, c, j)
        if a.status != "ok":
            assert a.error and c["error"] and j["error"]
            continue
        assert a.language == c["language"] == j["language"], (a.path, a.language, c["language"], j["language"])
        assert abs(a.confidence - c["confidence"]) < 1e-4
        assert abs(a.confidence - float(j["confidence"])) < 1e-4, (a.path, a.confidence, j["confidence"])
        for lang, p in a.probabilities.items():
            assert abs(p - float(j[f"p_{lang}"])) < 1e-4
    assert {a.language for a in api} == {"en", "de", "unknown", None}


# ---------------------------------------------------------------- 7. Parquet

def _check_parquet(parquet: Path, csv_path: Path):
    rows = read_rows(csv_path)
    df = pd.read_parquet(parquet)
    table = pq.read_table(parquet)
    assert table.num_rows == len(df) == len(rows)
    assert df.path.tolist() == table.column("path").to_pylist() == [r["path"] for r in rows]
    assert df.status.tolist() == [r["status"] for r in rows]
    assert df.language.tolist() == [r["language"] for r in rows]
    pcols = [c for c in df.columns if c.startswith("p_")]
    assert pcols == ["p_de", "p_en"]
    assert str(df.confidence.dtype).startswith("float") and all(str(df[c].dtype).startswith("float") for c in pcols)
    scored = (df.status == "ok") & (df.error == "")
    assert scored.sum() > 0
    assert np.allclose(df.loc[scored, pcols].sum(axis=1), 1.0, atol=1e-4)
    try:
        import duckdb
    except ImportError:
        return
    n = duckdb.sql(f"select count(*) from read_parquet('{parquet}')").fetchone()[0]
    assert n == len(rows)


def test_parquet_from_cli_and_api(cli_run, small):
    work, expected, r = cli_run
    assert r.returncode == 0, r.stderr[-3000:]
    _check_parquet(work / "labels.parquet", work / "labels.csv")  # odd names, a newline in one
    d, _, _ = small
    write_parquet(str(d / "labels.csv"), str(d / "labels.parquet"))
    _check_parquet(d / "labels.parquet", d / "labels.csv")
    assert not (d / "labels.parquet.tmp").exists()


def test_parquet_of_a_large_csv_with_newlines_in_names(tmp_path):
    """Past pyarrow's 1 MiB read block, a newline inside a quoted name must not split a row."""
    labels, opts = ["de", "en"], LabelOptions(probabilities=True)
    # the newline early in most names: a block boundary then mostly falls after it inside the quoted field
    paths = [f"/d/{i}\n" + ("second line, \"quoted\" and long enough to matter " * 2 + f"{i}.wav" if i % 4 else
                            f"clip{i}.flac") for i in range(20000)]
    answers = []
    for i, p in enumerate(paths):
        ok = i % 5 != 0
        answers.append({"path": p, "language": "en" if ok else "", "confidence": 0.75 if ok else None,
                        "top_languages": "en:0.7500 de:0.2500" if ok else "", "duration": 1.5 if ok else None,
                        "windows": 2 * ok, "windows_used": 2 * ok, "status": "ok" if ok else "error",
                        "error": None if ok else "empty file (0 bytes)",
                        "probabilities": [0.25, 0.75] if ok else [float("nan")] * 2, "segments": []})
    with open(tmp_path / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(csv_columns(labels, opts))
        w.writerows(answer_rows(pa.Table.from_pylist(answers, schema=result_schema(len(labels))), opts))
    assert (tmp_path / "labels.csv").stat().st_size > 3 << 19  # 1.5 MiB
    write_parquet(str(tmp_path / "labels.csv"), str(tmp_path / "labels.parquet"))
    df = pd.read_parquet(tmp_path / "labels.parquet")
    assert df.path.tolist() == paths
    assert (df.status == "ok").sum() == 16000 and df.p_en.isna().sum() == 4000
    assert df.path.str.contains("\n").all()
    assert np.allclose(df.p_en.fillna(0.25) + df.p_de.fillna(0.75), 1.0)

# The CSV writer's round trip for any file name is a property in tests/test_properties.py.
