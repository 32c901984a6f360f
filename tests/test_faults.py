"""Fault injection on a real local Ray: a worker process, or the driver, is killed in the middle of each job.

The promise: Ray's retries (a worker dies) or a rerun of the same command (the driver dies) end with what an
undisturbed run gives: every record once, none lost, none twice, and never a half-written file where a
reader looks.

Seven faults here: preprocessing, two task workers (Ray Data retries the tasks) and the driver with its embedded
Ray (the rerun); training, the Ray Train worker (FailureConfig restarts it from the last checkpoint);
labeling, a reading task's worker, a decoding task's worker and the model actor (Ray Data retries the tasks and
restarts the actor).

Worker kills hit only this session's own Ray: processes under the test process (its embedded Ray's raylet and
the workers it starts), picked by the title Ray gives a worker while it runs a task or actor
(`ray::MapBatches(process_batch)`, `ray::RayTrainWorker`, ...). Ray's state API is not used: the test Ray runs
without a dashboard, and on a shared machine the API's default address may be somebody else's cluster.

Driver kills of the other two jobs are in their own modules: training,
tests/test_training.py::test_killed_training_resumes_from_its_checkpoint; labeling,
tests/test_label.py::test_resume_after_kill and ::test_resume_after_a_cut_partial_file.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from conftest import REPO, TONE_CFG, tone, voice, write_wav
from langid.config import FeatureConfig
from langid.store import ERRORS, WINDOWS, Store
from test_training import BANDS, CFG as TRAIN_CFG, _latest_checkpoint, expected_epochs, make_corpus, read_history

pytestmark = pytest.mark.slow

PROCESS_BATCH = "ray::MapBatches(process_batch)"  # a preprocessing task
READ_ITEMS = "ray::MapBatches(read_items)"  # a labeling reading task: a chunk of paths, or an archive's members
FEATURIZE = "ray::MapBatches(featurize_batch)"  # a labeling decode task
PREDICTOR_BUSY = "ray::MapWorker(MapBatches(Predictor)).submit"  # a labeling model actor running a batch
TRAIN_WORKER = "ray::RayTrainWorker"  # a Ray Train worker actor


# ---------------------------------------------------------------- processes

def descendants(pid: int) -> list[int]:
    """Every process under `pid` (children of all its threads, recursively), from /proc."""
    todo, out = [pid], []
    while todo:
        for children in glob.glob(f"/proc/{todo.pop()}/task/*/children"):
            try:
                kids = [int(x) for x in Path(children).read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def title(pid: int) -> str:
    """The process's title: for a Ray worker, `ray::<task or actor>` while it runs one."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def live_in_session(sid: int) -> list[int]:
    """Processes (not zombies) of a session: everything a driver started with start_new_session, Ray included."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(d))
    return out


class WorkerKiller(threading.Thread):
    """SIGKILLs Ray workers of this process's Ray while a job runs, one per step of a plan.

    A step is (title prefix, progress needed): once `progress()` (output visible so far) reaches the number,
    the first worker whose title starts with the prefix is killed; steps wait for their own title, in order for
    the same title. `killed` records (pid, title, progress, observe()) per kill, in the order they happened;
    `seen` every pid that carried one of the plan's titles, before or after.
    """

    def __init__(self, plan: list[tuple[str, int]], progress: Callable[[], int],
                 observe: Callable[[], object] = lambda: None):
        super().__init__(daemon=True)
        self.plan, self.progress, self.observe = list(plan), progress, observe
        self.killed: list[tuple[int, str, int, object]] = []
        self.seen: dict[str, set[int]] = {prefix: set() for prefix, _ in plan}
        self.done = threading.Event()

    def run(self):
        me = os.getpid()
        while not self.done.is_set():
            progress = self.progress() if self.plan else 0
            for pid in descendants(me):
                name = title(pid)
                for prefix in self.seen:
                    if name.startswith(prefix):
                        self.seen[prefix].add(pid)
                step = next((s for s in self.plan if name.startswith(s[0])), None)
                if step and progress >= step[1] and pid not in {k[0] for k in self.killed}:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append((pid, name, progress, self.observe()))
                    self.plan.remove(step)
            time.sleep(0.01)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join(10)


# ---------------------------------------------------------------- preprocessing

CFG = FeatureConfig(window_seconds=2.0, n_mels=32)  # each 3-s clip: a full window and a padded tail
BATCH = 2  # files per task: many small tasks, so a kill always lands mid-job
N_FILES = 38  # the corpus below


def preprocess_cmd(corpus: Path, store: Path) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "preprocess.py"), "--input", str(corpus), "--output", str(store),
            "--png", "--batch-size", str(BATCH), "--window-seconds", str(CFG.window_seconds),
            "--n-mels", str(CFG.n_mels), "--num-cpus", "2", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Kaggle layout: 2 tone 'languages' x 6 recordings x 3 fragments, plus an empty and a non-audio file."""
    root = tmp_path_factory.mktemp("faults") / "kaggle"
    for lang, f0 in {"en": 300.0, "de": 900.0}.items():
        for r in range(6):
            rec = f"{lang}{r}".encode().hex().ljust(32, "0")[:32]
            for frag in range(3):
                write_wav(root / "train" / "train" / f"{lang}_m_{rec}.fragment{frag}.flac",
                          tone(f0 + 10 * r, 3.0, 22050, seed=frag), 22050)
    (root / "train" / "train" / f"en_f_{'ab' * 16}.fragment0.flac").write_bytes(b"")
    (root / "train" / "train" / f"de_f_{'cd' * 16}.fragment0.flac").write_bytes(b"not audio\n" * 50)
    return root


@pytest.fixture(scope="module")
def reference(ray_local, corpus, tmp_path_factory) -> Path:
    """The undisturbed run every faulty one is compared with."""
    from langid.preprocess import run_preprocess

    store = tmp_path_factory.mktemp("reference") / "store"
    res = run_preprocess(str(corpus), str(store), CFG, png=True, batch_size=BATCH, progress=False)
    assert (res.files_seen, res.ok, res.failed) == (N_FILES, N_FILES - 2, 2), res.summary()
    return store


def store_records(store: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(windows, errors) of a store in a canonical order, each spectrogram as a digest of its float32 values."""
    st = Store(str(store))
    win = st.read(WINDOWS).to_pandas()
    win["logmel"] = [hashlib.sha1(np.asarray(v, np.float32).tobytes()).hexdigest() for v in win.logmel]
    win = win.sort_values(["path", "window_index"]).reset_index(drop=True)
    err = st.read(ERRORS).to_pandas().sort_values("path").reset_index(drop=True)
    return win, err


def assert_same_records(store: Path, reference: Path, corpus: Path) -> int:
    """The store holds exactly the reference's records, each file once; returns its window count."""
    win, err = store_records(store)
    ref_win, ref_err = store_records(reference)
    assert not win.duplicated(["path", "window_index"]).any()
    assert not err.path.duplicated().any()
    assert not set(win.path) & set(err.path)
    assert set(win.path) | set(err.path) == {str(p) for p in corpus.rglob("*.flac")}
    pd.testing.assert_frame_equal(win, ref_win)
    pd.testing.assert_frame_equal(err, ref_err)
    return len(win)


def assert_readers_see_whole_files(store: Path, finished: bool = True) -> None:
    """Every file under a reader's name is whole (each shard and PNG reads) and every window has its image;
    leftovers of a killed write are hidden temporary names that no reader picks up. A killed run may leave
    images of files whose shard it did not write (whole files, rewritten the same by the rerun); a finished
    one has exactly one image per window."""
    st = Store(str(store))
    hidden = [p for p in store.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert all(p.name.endswith(".tmp") for p in hidden), hidden
    for table in (WINDOWS, ERRORS):
        shards = sorted((store / table).glob("*.parquet"))
        assert [str(p) for p in shards] == st.shards(table)
        rows = sum(pq.read_table(p).num_rows for p in shards)
        assert rows == st.read(table).num_rows
        if shards:
            assert len(pd.read_parquet(store / table)) == rows  # pandas/pyarrow skip the hidden names too
    pngs = {str(p) for p in (store / "png").rglob("*.png")}
    for p in pngs:
        Image.open(p).load()
    win = st.read(WINDOWS, columns=["path", "split", "language", "window_index"]).to_pylist()
    images = {st.png_path(w["split"], w["language"], w["path"], w["window_index"]) for w in win}
    assert images == pngs if finished else images <= pngs


def windows_shards(store: Path) -> int:
    return len(list((store / WINDOWS).glob("*.parquet")))


def test_preprocess_survives_killed_workers(ray_local, corpus, reference, tmp_path):
    """Two preprocessing tasks lose their worker process mid-job; Ray retries them and the store is complete."""
    from langid.preprocess import run_preprocess

    store = tmp_path / "store"
    n_shards = windows_shards(reference)
    with WorkerKiller([(PROCESS_BATCH, 1), (PROCESS_BATCH, 3)], lambda: windows_shards(store)) as killer:
        res = run_preprocess(str(corpus), str(store), CFG, png=True, batch_size=BATCH, progress=False)
    assert len(killer.killed) == 2, f"the job ended before both kills: {killer.killed}"
    for pid, name, shards_then, _ in killer.killed:
        assert name.startswith(PROCESS_BATCH) and 1 <= shards_then < n_shards  # killed mid-job
    assert (res.files_seen, res.skipped_done, res.ok, res.failed) == (N_FILES, 0, N_FILES - 2, 2)  # each once
    windows = assert_same_records(store, reference, corpus)
    assert res.windows == windows
    assert_readers_see_whole_files(store)


def test_preprocess_rerun_after_killed_driver(corpus, reference, tmp_path):
    """`jobs/preprocess.py` with Ray embedded is killed mid-job with everything it started; the same command
    again completes the store, redoing only the files that had no record yet."""
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # Ray starts inside the job
    cmd = preprocess_cmd(corpus, store)
    log = open(tmp_path / "first.log", "w+")
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and windows_shards(store) < 2:
            time.sleep(0.02)
        running = proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.seek(0)
        first_log = log.read()
        log.close()
    assert running, f"the job ended before the kill:\n{first_log[-2000:]}"
    assert proc.returncode == -signal.SIGKILL

    # the embedded Ray dies with its driver: nothing is left to write into the store after the kill
    deadline = time.monotonic() + 60
    while live_in_session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = live_in_session(proc.pid)
    for pid in left:  # ours (this job's session), and a failure below
        os.kill(pid, signal.SIGKILL)
    assert not left, [title(p) for p in left]

    assert_readers_see_whole_files(store, finished=False)
    done = Store(str(store)).done_paths()
    assert 2 <= len(done) < N_FILES  # killed mid-job: some files have their record, others not

    again = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{N_FILES} files: {len(done)} already in the store" in again.stdout, again.stdout
    assert_same_records(store, reference, corpus)
    assert_readers_see_whole_files(store)


# ---------------------------------------------------------------- training

def logs_dir() -> Path:
    """This session's Ray log folder, where each worker's prints land in worker-<id>-<job>-<pid>.out."""
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())


def worker_output(pid: int) -> str:
    return "".join(p.read_text(errors="replace") for p in logs_dir().glob(f"worker-*-{pid}.out"))


EPOCH_LINE = re.compile(r"^stage (\d+)/\d+ \(\S+\) epoch (\d+)/\d+: train_loss (\S+) valid_loss (\S+) ", re.M)
RESUME_LINE = re.compile(r"resuming from checkpoint: stage (\d+), (\d+) epochs done in it")


def test_training_survives_a_killed_worker_and_resumes_from_its_checkpoint(ray_local, tmp_path):
    """The Ray Train worker is killed once a stage-2 epoch is checkpointed; Ray Train (FailureConfig
    max_failures) starts a new worker, which resumes from the last checkpoint: no epoch lost or trained twice."""
    from langid.artifact import load_network
    from langid.preprocess import run_preprocess
    from langid.training import TrainConfig, default_schedule, run_training

    corpus = make_corpus(tmp_path / "corpus", {k: 5 for k in BANDS}, {})
    res = run_preprocess(str(corpus), str(tmp_path / "store"), TRAIN_CFG, batch_size=16, progress=False)
    assert (res.ok, res.failed) == (15, 0), res.errors
    out = tmp_path / "model"
    stages = default_schedule((1, 2, 1), (1e-2, 2e-3, 1e-4))
    total = sum(s.epochs for s in stages)
    tc = TrainConfig(store=str(tmp_path / "store"), output=str(out), arch="resnet18", stages=stages, batch_size=8,
                     workers=1, max_failures=1)

    def epochs_checkpointed() -> int:
        ckpt = _latest_checkpoint(out)
        return len(json.loads((ckpt / "state.json").read_text())["history"]) if ckpt else 0

    with WorkerKiller([(TRAIN_WORKER, 2)], epochs_checkpointed) as killer:
        # progress=None: rank 0 prints its lines into its own log (as with --quiet), which tells the two workers apart
        run_training(tc, pretrained=False, log=lambda *_: None, progress=None)
    assert len(killer.killed) == 1, "training ended before the kill"
    killed_pid, _, checkpointed, _ = killer.killed[0]
    restarted = killer.seen[TRAIN_WORKER] - {killed_pid}
    assert len(restarted) == 1, killer.seen
    first, second = worker_output(killed_pid), worker_output(restarted.pop())

    # the new worker resumed from the last checkpoint Ray Train had registered: the one seen before the kill
    # or, when the controller collected the worker's next report before it noticed the death, that one
    found = RESUME_LINE.findall(second)
    assert len(found) == 1, second
    stage_no, epochs_done = map(int, found[0])
    resumed = sum(s.epochs for s in stages[:stage_no - 1]) + epochs_done  # epochs done in all
    assert checkpointed <= resumed < total, (checkpointed, found)
    # ...and trained exactly the epochs after it; the first worker, the epochs up to it (and maybe the next)
    order = [(i + 1, e) for i, s in enumerate(stages) for e in range(1, s.epochs + 1)]  # (stage no., epoch)
    trained_first = [order.index((int(s), int(e))) for s, e, _, _ in EPOCH_LINE.findall(first)]
    trained_second = [order.index((int(s), int(e))) for s, e, _, _ in EPOCH_LINE.findall(second)]
    assert trained_first == list(range(len(trained_first))) and len(trained_first) >= resumed, first
    assert trained_second == list(range(resumed, total)), second

    # the model's history: each epoch once, in order; the epochs before the resume point are the first
    # worker's (from the checkpoint, not recomputed), the others the new worker's
    hist = read_history(out)
    assert [(h["stage"], int(h["epoch"])) for h in hist] == expected_epochs(stages)
    printed = [(float(a), float(b)) for _, _, a, b in EPOCH_LINE.findall(first)][:resumed] + \
        [(float(a), float(b)) for _, _, a, b in EPOCH_LINE.findall(second)]
    for h, (train_loss, valid_loss) in zip(hist, printed, strict=True):
        assert float(h["train_loss"]) == pytest.approx(train_loss, abs=6e-5)
        assert float(h["valid_loss"]) == pytest.approx(valid_loss, abs=6e-5)
    model, meta = load_network(str(out))
    assert meta["labels"] == sorted(BANDS)
    assert not [p for p in out.rglob("*.tmp")]


# ---------------------------------------------------------------- labeling

N_MEMBERS = 24


def clip_language(i: int) -> str:
    return "en" if i % 2 == 0 else "de"


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def partial_rows(path: Path) -> int:
    try:
        return max(0, Path(path).read_text().count("\n") - 1)
    except OSError:
        return 0


def write_inputs(folder: Path) -> Path:
    """A file list (@list) of N_MEMBERS 6-s tones of the tone model's two languages: half WAV files, half the
    members of one tar archive. Returns the list file."""
    rate = TONE_CFG.sample_rate
    clips = {f"f{i:02d}.wav": wav_bytes(voice(clip_language(i), 6.0, seed=i), rate) for i in range(N_MEMBERS)}
    folder.mkdir(parents=True)
    names = sorted(clips)
    for name in names[:N_MEMBERS // 2]:
        (folder / name).write_bytes(clips[name])
    with tarfile.open(folder / "clips.tar", "w") as tar:
        for name in names[N_MEMBERS // 2:]:
            member = tarfile.TarInfo(name)
            member.size = len(clips[name])
            tar.addfile(member, io.BytesIO(clips[name]))
    listing = folder / "inputs.lst"
    listing.write_text("".join(f"{folder / n}\n" for n in names[:N_MEMBERS // 2] + ["clips.tar"]))
    return listing


@pytest.fixture(scope="module")
def label_inputs(model_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The inputs, and their undisturbed run: (list file, {path: CSV row})."""
    from langid.labeling import run_label

    base = tmp_path_factory.mktemp("label")
    listing = write_inputs(base / "in")
    res = run_label(str(model_dir), f"@{listing}", str(base / "labels.csv"), batch_size=2, progress=False)
    rows = {r["path"]: r for r in csv_rows(base / "labels.csv")}
    assert (res.total, res.errors, len(rows)) == (N_MEMBERS, 0, N_MEMBERS)
    assert sorted((Path(p.split("::")[-1]).name, r["language"]) for p, r in rows.items()) == \
        [(f"f{i:02d}.wav", clip_language(i)) for i in range(N_MEMBERS)]
    return listing, rows


def test_labeling_survives_killed_workers(model_dir, label_inputs, tmp_path):
    """While files and an archive's members are labelled, worker processes are killed: a reading task's (the
    generator that lists files or reads archive members), a decoding task's, and the model actor's in the
    middle of a batch. Ray Data retries the tasks and restarts the actor; the CSV has every file's row once,
    as the undisturbed run has it, and appears only when complete."""
    from langid.labeling import PARTIAL, run_label

    listing, expected = label_inputs
    out = tmp_path / "labels.csv"
    partial = Path(str(out) + PARTIAL)
    plan = [(READ_ITEMS, 0), (FEATURIZE, 0), (PREDICTOR_BUSY, 3)]
    with WorkerKiller(plan, lambda: partial_rows(partial), observe=out.exists) as killer:
        res = run_label(str(model_dir), f"@{listing}", str(out), batch_size=2, progress=False)
    assert sorted(next(p for p, _ in plan if name.startswith(p)) for _, name, _, _ in killer.killed) == \
        sorted(p for p, _ in plan), f"the job ended before every kill: {killer.killed}"
    for _, _, rows_then, final_csv_then in killer.killed:
        assert rows_then < N_MEMBERS and not final_csv_then  # mid-job, and no finished CSV yet
    assert (res.total, res.resumed, res.labelled, res.errors) == (N_MEMBERS, 0, N_MEMBERS, 0)
    assert not list(tmp_path.glob("labels.csv?*"))  # no partial or temporary file left beside the CSV
    rows = csv_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(expected)  # every file, once
    for r in rows:
        e = expected[r["path"]]
        assert (r["language"], r["status"], r["windows"], r["windows_used"], r["duration"]) == \
            (e["language"], e["status"], e["windows"], e["windows_used"], e["duration"])
        assert float(r["confidence"]) == pytest.approx(float(e["confidence"]), abs=1e-5)
