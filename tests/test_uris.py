"""Every job reads and writes object-store URIs as well as local paths (here file:// URIs, which go through
the same pyarrow filesystem code as s3:// and gs://), and the resource flags reach Ray."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from langid import uris
from langid.cli import main
from langid.store import Store
from test_training import BANDS, make_corpus

FEATURES = ["--window-seconds", "1", "--n-mels", "32"]


def test_list_files_gives_uris_and_skips_hidden_names(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.wav", "a/b/y.flac", "a/.tmp.wav", ".hidden/z.wav"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"1")
    uri = f"file://{tmp_path}"
    assert uris.list_files(uri) == [f"{uri}/a/b/y.flac", f"{uri}/a/x.wav"]
    assert uris.list_files(str(tmp_path)) == [str(tmp_path / "a/b/y.flac"), str(tmp_path / "a/x.wav")]


def test_staged_folder_publishes_only_on_success_and_metadata_last(tmp_path):
    target = f"file://{tmp_path}/model"
    with pytest.raises(RuntimeError):
        with uris.StagedFolder(target) as local:
            (tmp_path.joinpath(local) / "model.json").write_text("{}")
            raise RuntimeError("training failed half way")
    assert not (tmp_path / "model").exists()  # nothing half-written is visible
    with uris.StagedFolder(target) as local:
        for name in ("model.json", "model.safetensors", "stages/head/model.json"):
            p = tmp_path.joinpath(local, name)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(name)
    written = sorted(p.relative_to(tmp_path / "model").as_posix() for p in (tmp_path / "model").rglob("*") if p.is_file())
    assert written == ["model.json", "model.safetensors", "stages/head/model.json"]
    # the top-level model.json is written after the weights it describes
    assert (tmp_path / "model/model.json").stat().st_mtime_ns >= (tmp_path / "model/model.safetensors").stat().st_mtime_ns


def test_every_job_on_uris_matches_local_paths(ray_local, tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus", {k: 4 for k in BANDS}, {k: 1 for k in BANDS})
    u = lambda name: f"file://{tmp_path}/{name}"

    assert main(["preprocess", "--input", u("corpus"), "--output", u("store"), "--quiet", "--batch-size", "4",
                 "--memory-per-task", "64M", *FEATURES]) == 0
    assert main(["preprocess", "--input", str(corpus), "--output", str(tmp_path / "store-local"), "--quiet",
                 "--batch-size", "4", *FEATURES]) == 0
    remote, local = Store(u("store")).read(), Store(str(tmp_path / "store-local")).read()
    assert remote.num_rows == local.num_rows > 0
    key = lambda t: sorted((p.rsplit("/", 1)[-1], s, w) for p, s, w in
                           zip(*(t.column(c).to_pylist() for c in ("path", "split", "window_index"))))
    assert key(remote) == key(local)  # same files, same grouped split, same windows
    assert all(p.startswith("file://") for p in remote.column("path").to_pylist())

    assert main(["train", "--store", u("store"), "--output", u("model"), "--arch", "resnet18", "--epochs", "1,0,0",
                 "--batch-size", "8", "--no-pretrained", "--quiet", "--memory-per-worker", "256M"]) == 0
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"model.safetensors", "model.json", "history.csv", "training_curves.png", "run.json"} <= files

    assert main(["evaluate", "--model", u("model"), "--store", u("store"), "--output", u("report"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["files"] == len(BANDS)
    assert (tmp_path / "report" / "confusion_matrix.png").stat().st_size > 0

    capsys.readouterr()
    args = ["--model", u("model"), "--input", u("corpus/test/test"), "--quiet", "--memory-per-actor", "128M",
            "--cpus-per-task", "0.5"]
    outputs = ["--output", u("labels.csv"), "--parquet", u("labels.parquet"), "--segments", u("segments.csv")]
    assert main(["label", *args, *outputs]) == 0
    assert main(["label", *args, "--model", str(tmp_path / "model"), "--input", str(corpus / "test" / "test"),
                 "--output", str(tmp_path / "labels-local.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "labels.csv")))
    local_rows = list(csv.DictReader(open(tmp_path / "labels-local.csv")))
    assert len(rows) == len(local_rows) == len(BANDS)
    assert {r["path"].rsplit("/", 1)[-1]: r["language"] for r in rows} == \
        {r["path"].rsplit("/", 1)[-1]: r["language"] for r in local_rows}
    assert all(r["status"] == "ok" and r["path"].startswith("file://") for r in rows)
    assert pq.read_table(tmp_path / "labels.parquet").num_rows == len(BANDS)
    assert (tmp_path / "segments.csv").exists()
    assert not list(tmp_path.glob("*.partial"))

    # a rerun finds the finished CSV at its URI and adds nothing twice
    assert main(["label", *args, *outputs]) == 0
    assert list(csv.DictReader(open(tmp_path / "labels.csv"))) == rows


def test_preprocess_refuses_a_missing_uri_before_starting_ray(tmp_path, capsys):
    assert main(["preprocess", "--input", f"file://{tmp_path}/nothing", "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "no such directory or manifest file" in err and len(err.strip().splitlines()) == 1


def test_a_model_at_a_uri_is_fetched_once_without_its_checkpoints(tmp_path):
    model = tmp_path / "model"
    for name in ("model.json", "model.safetensors", "ray/train/checkpoint_1/checkpoint.pt", "stages/head/model.json"):
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_text(name)
    local = uris.local_folder(f"file://{model}")
    assert sorted(p.name for p in Path(local).iterdir()) == ["model.json", "model.safetensors"]
    assert (Path(local) / "model.json").read_text() == "model.json"
    assert uris.local_folder(f"file://{model}") == local  # one copy per process
    with pytest.raises(FileNotFoundError):
        uris.local_folder(f"file://{tmp_path}/nothing")
