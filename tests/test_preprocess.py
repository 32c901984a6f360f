"""The preprocessing job end to end on a real local Ray: store contents, resume, safety, the CLI."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO
from langid.config import FeatureConfig
from langid.preprocess import files_per_task, run_preprocess
from langid.sources import KAGGLE_PATTERN
from langid.store import CONFIG_KEY, ERRORS, WINDOWS, Store, StoreError, logmel_matrix
from langid.uris import write_atomic

# small windows keep the job fast: each 3 s fixture clip gives one full window and a kept 1 s tail
CFG = FeatureConfig(window_seconds=2.0, n_mels=32)
BROKEN = {"empty": "en_f_" + "ab" * 16 + ".fragment0.flac",
          "not_audio": "de_f_" + "cd" * 16 + ".fragment0.flac",
          "truncated": "es_m_" + "ef" * 16 + ".fragment0.flac",
          "bad_name": "badname.flac"}


def _run(tree, store, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("progress", False)
    return run_preprocess(str(tree), str(store), kw.pop("cfg", CFG), **kw)


def _inputs(tree: Path) -> set[str]:
    return {str(p) for p in tree.rglob("*.flac")}


def _all_files(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.is_file()]


def _shards(store: Path) -> dict[str, float]:
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.glob("*/*.parquet")}


@pytest.fixture
def done(ray_local, kaggle_tree, tmp_path):
    """One run of the job on the Kaggle fixture, with PNGs."""
    store = tmp_path / "store"
    res = _run(kaggle_tree, store, png=True)
    return kaggle_tree, store, res


@pytest.mark.slow
def test_files_per_task_spreads_work_but_keeps_shards_reasonable():
    assert files_per_task(73080, 32, 64) == 32  # big jobs: full batches
    assert files_per_task(200, 32, 2) == 25  # four tasks per CPU
    assert files_per_task(3, 32, 2) == 4 and files_per_task(24, 8, 2) == 4  # never tiny shards
    assert files_per_task(10, 2, 2) == 2  # an explicit small batch size wins


def test_end_to_end(done):
    tree, store_dir, res = done
    inputs = _inputs(tree)
    assert len(inputs) == 24
    st = Store(str(store_dir))

    # one record per input file: in windows (as one or more windows) or in errors, never both, never neither
    win = st.read(WINDOWS)
    err = st.read(ERRORS)
    win_paths = set(win.column("path").to_pylist())
    err_paths = err.column("path").to_pylist()
    assert len(err_paths) == len(set(err_paths))
    assert win_paths | set(err_paths) == inputs
    assert not win_paths & set(err_paths)
    assert (res.files_seen, res.skipped_done, res.ok + res.failed) == (24, 0, 24)
    assert (res.ok, res.failed, res.windows) == (len(win_paths), len(err_paths), win.num_rows)
    assert sorted(p for p, _ in res.errors) == sorted(err_paths)

    # the broken files, each with its reason
    reasons = {os.path.basename(p): r for p, r in zip(err_paths, err.column("error").to_pylist())}
    assert all(r for r in reasons.values())
    assert "empty" in reasons[BROKEN["empty"]]
    assert "not a readable audio file" in reasons[BROKEN["not_audio"]]
    assert KAGGLE_PATTERN in reasons[BROKEN["bad_name"]]
    trunc = [p for p in inputs if p.endswith(BROKEN["truncated"])]
    assert len(trunc) == 1 and ((trunc[0] in win_paths) != (trunc[0] in err_paths))
    good = inputs - {p for p in inputs if os.path.basename(p) in BROKEN.values()}
    assert good <= win_paths  # all 20 tone files decoded

    # window rows: two per 3 s file (0 s full, 2 s padded tail), labelled from the file name and split
    rows = win.drop_columns(["logmel"]).to_pandas()
    by_file = rows[rows.path.isin(good)].groupby("path")
    assert (by_file.size() == 2).all()
    assert sorted(rows.window_start.unique().tolist())[:2] == [0.0, 2.0]
    tail = rows[rows.window_index == 1]
    assert tail.quality_flags.str.contains("padded").all()
    g = rows[rows.path.isin(good)]
    assert (g.source_sample_rate == 22050).all() and (g.source_channels == 1).all()
    assert np.allclose(g.duration, 3.0, atol=1e-3)
    assert set(g.split) == {"train", "valid", "test"}
    assert set(g[g.path.str.contains("/test/")].split) == {"test"}
    assert (g.language == g.path.map(lambda p: os.path.basename(p)[:2])).all()
    per_rec = g.groupby("recording_id").split.nunique()
    assert (per_rec == 1).all()  # augmented twins never straddle train and valid

    # the store's configuration: the file, and the same JSON in every shard's metadata
    assert st.read_config() == CFG
    shards = sorted(store_dir.glob("*/*.parquet"))
    assert {p.parent.name for p in shards} == {WINDOWS, ERRORS}
    per_task = files_per_task(24, 8, 2)  # the fixture's Ray has 2 CPUs
    assert per_task == 4
    # every shard holds at most per_task files, and together they hold the 20 ok files
    sizes = [len(set(pq.read_table(p, columns=["path"]).column("path").to_pylist()))
             for p in (store_dir / WINDOWS).glob("*.parquet")]
    assert max(sizes) <= per_task and sum(sizes) == len(win_paths)
    for shard in shards:
        meta = pq.read_schema(shard).metadata
        assert FeatureConfig.from_json(meta[CONFIG_KEY]) == CFG

    # pandas reads the folder as one table; logmel rows are n_mels * n_frames floats
    df = pd.read_parquet(store_dir / WINDOWS)
    assert len(df) == win.num_rows
    assert (df.n_mels == CFG.n_mels).all() and (df.n_frames == CFG.window_frames).all()
    assert {len(v) for v in df.logmel} == {CFG.n_mels * CFG.window_frames}
    m = logmel_matrix(win)
    assert m.shape == (win.num_rows, CFG.n_mels, CFG.window_frames)
    assert m.min() >= 0.0 and m.max() <= 1.0

    # --png: one image per window, the window's spectrogram, in png/<split>/<lang>/
    pngs = sorted((store_dir / "png").rglob("*.png"))
    assert len(pngs) == win.num_rows
    expected = {st.png_path(r.split, r.language, r.path, r.window_index) for r in rows.itertuples()}
    assert {str(p) for p in pngs} == expected
    first = rows.iloc[0]
    img = Image.open(io.BytesIO(Path(st.png_path(first.split, first.language, first.path, first.window_index))
                                .read_bytes()))
    assert img.size == (CFG.window_frames, CFG.n_mels)
    np.testing.assert_array_equal(np.asarray(img), np.round(m[0][::-1] * 255).astype(np.uint8))

    # nothing left under a temporary name
    for p in _all_files(store_dir):
        assert not p.name.startswith(".") and not p.name.endswith(".tmp"), p


@pytest.mark.slow
def test_resume_and_config_mismatch(done):
    tree, store_dir, first = done
    before = _shards(store_dir)
    pngs_before = {str(p): p.stat().st_mtime_ns for p in (store_dir / "png").rglob("*.png")}
    again = _run(tree, store_dir, png=True)
    assert again.files_seen == 24 and again.skipped_done == 24
    assert (again.ok, again.failed, again.windows, again.errors) == (0, 0, 0, [])
    assert _shards(store_dir) == before  # same shard names, untouched
    assert {str(p): p.stat().st_mtime_ns for p in (store_dir / "png").rglob("*.png")} == pngs_before

    # a half-done store: drop one windows shard; only its files are redone, and they come back the same
    st = Store(str(store_dir))
    victim = sorted((store_dir / WINDOWS).glob("*.parquet"))[0]
    lost = set(pq.read_table(victim, columns=["path"]).column("path").to_pylist())
    full = st.read(WINDOWS).sort_by([("path", "ascending"), ("window_index", "ascending")])
    victim.unlink()
    third = _run(tree, store_dir)
    assert third.skipped_done == 24 - len(lost) and third.ok == len(lost) and third.failed == 0
    assert st.read(WINDOWS).sort_by([("path", "ascending"), ("window_index", "ascending")]).equals(full)
    after = _shards(store_dir)
    kept = {k: v for k, v in before.items() if k != f"{WINDOWS}/{victim.name}"}
    assert {k: after.get(k) for k in kept} == kept  # the other shards are not rewritten
    assert len(after) == len(before) and all(k.startswith(WINDOWS + "/") for k in set(after) - set(kept))

    # other features on the same store: refused before anything is written
    snapshot = {str(p): p.stat().st_mtime_ns for p in _all_files(store_dir)}
    with pytest.raises(StoreError) as ei:
        _run(tree, store_dir, cfg=FeatureConfig(window_seconds=2.0, n_mels=64))
    assert "n_mels: 32 vs 64" in str(ei.value)
    assert {str(p): p.stat().st_mtime_ns for p in _all_files(store_dir)} == snapshot
    assert Store(str(store_dir)).read_config() == CFG


def test_readers_ignore_leftover_temporary_files(tmp_path):
    """A run killed mid-write leaves `.part-<id>.parquet.<hex>.tmp`; no reader may see it."""
    st = Store(str(tmp_path / "store"))
    st.init(CFG)
    row = {"path": "/a.flac", "language": "en", "split": "train", "recording_id": "r", "speaker": "r",
           "gender": "m", "fragment": 0, "augmentation": "original", "augmentation_index": None,
           "window_index": 0, "window_start": 0.0, "duration": 1.0, "source_sample_rate": 16000,
           "source_channels": 1, "quality_flags": "", "n_mels": 2, "n_frames": 2,
           "logmel": np.array([0.1, 0.2, 0.3, 0.4], np.float32)}
    table = pa.Table.from_pylist([row])
    target = st.write_shard(WINDOWS, table, "good")
    data = Path(target).read_bytes()
    wdir = tmp_path / "store" / WINDOWS
    # a whole shard under a temporary name (killed just before the rename) and a half-written one
    (wdir / ".part-x.parquet.0123456789abcdef0123456789abcdef.tmp").write_bytes(data)
    (wdir / ".part-y.parquet.fedcba9876543210fedcba9876543210.tmp").write_bytes(data[: len(data) // 2])
    assert st.read(WINDOWS).num_rows == 1
    assert st.done_paths() == {"/a.flac"}
    assert len(pd.read_parquet(wdir)) == 1
    assert st.counts()["windows"] == 1

    # write_atomic leaves only the target behind
    write_atomic(st.fs, st.path(WINDOWS, "part-z.parquet"), data)
    assert sorted(p.name for p in wdir.iterdir() if not p.name.startswith(".")) == ["part-good.parquet",
                                                                                  "part-z.parquet"]
    assert len([p for p in wdir.iterdir() if p.name.startswith(".")]) == 2  # only the two planted ones


def test_store_without_config(tmp_path):
    with pytest.raises(StoreError, match="not a langid store"):
        Store(str(tmp_path / "nowhere")).read_config()
    empty = Store(str(tmp_path / "nowhere"))
    assert empty.read(WINDOWS).num_rows == 0 and empty.read(ERRORS).num_rows == 0
    assert empty.done_paths() == set()


# --- the command line ----------------------------------------------------------------------------

def _job(*args, timeout=180):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, str(REPO / "jobs" / "preprocess.py"), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=str(REPO))


def test_cli_help_does_not_start_ray():
    r = _job("--help", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--input" in r.stdout and "--output" in r.stdout and "--png" in r.stdout
    assert r.stderr == ""
    # and in-process: parsing --help never imports Ray
    code = ("import runpy, sys\n"
            f"sys.argv = [{str(REPO / 'jobs' / 'preprocess.py')!r}, '--help']\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr


def test_cli_missing_required_flag():
    r = _job("--output", "x", timeout=60)
    assert r.returncode == 2
    assert "--input" in r.stderr


@pytest.mark.slow
def test_cli_missing_input(tmp_path):
    missing = tmp_path / "no-such-corpus"
    r = _job("--input", str(missing), "--output", str(tmp_path / "store"), "--quiet", "--num-cpus", "1")
    assert r.returncode == 2, (r.stdout, r.stderr)
    # Ray's own log lines (timestamped) aside, stderr is exactly the one-line message
    ray_log = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING)\s")
    lines = [line for line in r.stderr.splitlines() if line.strip() and not ray_log.match(line)]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("langid preprocess: error:") and str(missing) in lines[0]
    assert not (tmp_path / "store").exists()  # nothing created for a run that cannot start
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
