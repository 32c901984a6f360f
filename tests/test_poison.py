"""Poison files: a file whose decoding kills the process (a decoder crash, the OOM killer) costs its own row, with
the reason, and nothing more. The test-only hook in langid.poison ends the decoding process with os._exit on a
file whose name holds $LANGID_TEST_CRASH_ON; each job runs as a user would run it, with its own embedded Ray
(which hands the variable to its workers), and must finish quietly with every file's record."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO, TONE_CFG, kaggle_name, voice, write_wav
from langid.poison import CRASH_VARIABLE, POISON_TRIES, PROCESS_DIED, Attempts
from test_faults import wav_bytes
from test_label import job_env, read_rows

RATE = TONE_CFG.sample_rate


def test_attempts_condemn_a_file_only_after_repeated_deaths(tmp_path, monkeypatch):
    """A decoding that began and never ended counts against its file; a finished one clears the count; each run
    counts apart, and the driver's close leaves nothing behind."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    attempts, other_run = Attempts(), Attempts()
    for _ in range(POISON_TRIES):  # each time, the process died before done()
        assert attempts.admit("bad.wav")
    assert not attempts.admit("bad.wav") and not attempts.admit("bad.wav")
    assert other_run.admit("bad.wav")  # another run of the job starts afresh
    for _ in range(POISON_TRIES + 2):  # a file that decodes fine is never condemned, however often it is redone
        assert attempts.admit("good.wav")
        attempts.done("good.wav")
    assert attempts.admit(os.fsdecode(b"odd \xff name.wav"))  # any key, even one that is not UTF-8
    attempts.close()
    other_run.close()
    assert list((tmp_path / "langid-attempts").iterdir()) == []


def run_job(script: str, *args: str, marker: str = "poison") -> subprocess.CompletedProcess:
    env = {**job_env(), CRASH_VARIABLE: marker}
    return subprocess.run([sys.executable, str(REPO / "jobs" / script), *args, "--num-cpus", "2"], env=env,
                          capture_output=True, text=True, timeout=600)


def quiet_stderr(r: subprocess.CompletedProcess) -> list[str]:
    """What the job printed besides its progress bar: nothing of Ray's (a dead worker's notices included)."""
    lines = [x for x in r.stderr.replace("\r", "\n").splitlines() if x.strip()]
    return [x for x in lines if not (x.startswith("label:") or x.startswith("preprocess:"))]


@pytest.mark.slow
def test_label_poison_file_is_one_error_row(model_dir, tmp_path):
    """A plain file and an archive member that kill their decoding process: each gets one error row after
    POISON_TRIES tries; the files decoded beside them in the same batch are labelled."""
    inp = tmp_path / "in"
    names = [f"clip{i}.wav" for i in range(6)]
    for i, name in enumerate(names):
        write_wav(inp / name, voice("en" if i % 2 else "de", 2.0, seed=i), RATE)
    write_wav(inp / "poison-a.wav", voice("en", 2.0), RATE)
    with tarfile.open(inp / "more.tar", "w") as tar:
        for name, lang in (("m-ok.wav", "de"), ("poison-b.wav", "en"), ("m-ok2.wav", "en")):
            data = wav_bytes(voice(lang, 2.0, seed=7), RATE)
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    listing = tmp_path / "inputs.lst"
    listing.write_text("".join(f"{inp / n}\n" for n in [*names, "poison-a.wav"]) + f"{inp / 'more.tar'}\n")
    out = tmp_path / "labels.csv"
    r = run_job("label.py", "--model", str(model_dir), "--input", f"@{listing}", "--output", str(out),
                "--batch-size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["path"]: row for row in read_rows(out)}
    poison = {str(inp / "poison-a.wav"), f"{inp / 'more.tar'}::poison-b.wav"}
    assert len(rows) == len(names) + 1 + 3  # every file once
    for path, row in rows.items():
        if path in poison:
            assert (row["status"], row["error"], row["language"]) == ("error", PROCESS_DIED, ""), row
        else:
            assert row["status"] == "ok" and row["language"] in ("en", "de"), row
    assert "2 errors" in r.stdout and "10 files" in r.stdout, r.stdout
    assert quiet_stderr(r) == [], r.stderr[-3000:]


@pytest.mark.slow
def test_preprocess_poison_file_is_one_error_record_and_leftovers_go(tmp_path):
    """Preprocessing: the file that kills its decoding process gets one error record after POISON_TRIES tries, the
    files of its task get their windows; a rerun (nothing left to do) removes the hidden temporary files that
    killed writers left in the store, and only those."""
    from langid.store import ERRORS, WINDOWS, Store

    corpus = tmp_path / "corpus" / "train" / "train"
    names = [kaggle_name("en" if i % 2 else "de", i) for i in range(6)]
    for i, name in enumerate(names):
        write_wav(corpus / name, voice("en" if i % 2 else "de", 2.0, seed=i), RATE)
    poison = f"en_m_{'0badf00d' * 4}.fragment0.flac"  # a Kaggle name, so that its marker is the recording id
    write_wav(corpus / poison, voice("en", 2.0), RATE)
    store = tmp_path / "store"
    args = ("--input", str(tmp_path / "corpus"), "--output", str(store), "--window-seconds", "1", "--n-mels", "32",
            "--sample-rate", str(RATE), "--hop-length", "160", "--fmax", "8000", "--batch-size", "8")
    r = run_job("preprocess.py", *args, marker="0badf00d")
    assert r.returncode == 0, r.stderr[-3000:]
    assert quiet_stderr(r) == [], r.stderr[-3000:]
    s = Store(str(store))
    errors = s.read(ERRORS).to_pylist()
    assert [(os.path.basename(e["path"]), e["error"]) for e in errors] == [(poison, PROCESS_DIED)]
    windowed = set(map(os.path.basename, s.read(WINDOWS, columns=["path"]).column("path").to_pylist()))
    assert windowed == set(names)
    assert "6 ok" in r.stdout and "1 failed" in r.stdout, r.stdout

    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    leftovers = [store / "windows" / ".part-0123.parquet.4f2a.tmp", store / "errors" / ".part-9.parquet.77.tmp",
                 store / ".feature_config.json.1c.tmp"]
    keep = [store / "windows" / ".notes", store / "windows" / "mine.tmp"]  # not a writer's hidden temporary
    for f in leftovers + keep:
        f.write_bytes(b"half-written")
    again = run_job("preprocess.py", *args, marker="0badf00d")
    assert again.returncode == 0 and "7 already in the store" in again.stdout, again.stdout + again.stderr[-2000:]
    assert [f for f in leftovers if f.exists()] == [] and all(f.exists() for f in keep)
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file() and p not in keep} == before
