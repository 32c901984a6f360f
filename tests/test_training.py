"""Training end to end on a real local Ray: the stage schedule, learning, 2-worker DDP, resume, the model artifact.

One small, clearly separable corpus is built once for this module: three "languages" that are noise
bands in far-apart frequency ranges, in the Kaggle layout (train/train, test/test), preprocessed with
the real preprocessing job into 1 s windows of 32 mel bands (32 x 101 spectrograms).
"""
from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import REPO, write_wav
from langid.config import FeatureConfig
from langid.artifact import META_FILE, WEIGHTS_FILE, ModelError, load_network, save_model
from langid.model import LangIdNet, layer_groups
from langid.learner import apply_stage, make_learner
from langid.training import Stage, TrainConfig, default_schedule, run_training

CFG = FeatureConfig(window_seconds=1.0, n_mels=32, hop_length=160)
RATE = 16000
# far-apart bands: 'aa' low, 'bb' middle, 'cc' high; each recording moves its band edges a little
BANDS = {"aa": (150.0, 450.0), "bb": (1200.0, 2000.0), "cc": (4000.0, 6000.0)}
TRAIN_RECORDINGS, TEST_RECORDINGS = 10, 3  # per language; 2 of the 10 go to validation (valid_fraction 0.2)


def band_noise(lo: float, hi: float, seconds: float, seed: int, rate: int = RATE) -> np.ndarray:
    """White noise band-passed to [lo, hi] Hz (FFT mask) over a faint broadband floor."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / rate)
    spec[(f < lo) | (f > hi)] = 0
    x = np.fft.irfft(spec, n)
    x = 0.3 * x / np.abs(x).max() + 0.002 * rng.standard_normal(n)
    return x.astype(np.float32)


def kaggle_name(lang: str, gender: str, tag: str, fragment: int = 0) -> str:
    rec = tag.encode().hex().ljust(32, "0")[:32]
    return f"{lang}_{gender}_{rec}.fragment{fragment}.flac"


def make_corpus(root: Path, train: dict[str, int], test: dict[str, int], seconds=(3.0, 2.0)) -> Path:
    """Kaggle tree of band-noise 'languages': `train[lang]` recordings under train/train, `test[lang]` under test/test."""
    seed = 0
    for lang, (lo, hi) in BANDS.items():
        for r in range(train.get(lang, 0)):
            seed += 1
            x = band_noise(lo * (1 + 0.04 * (r % 5)), hi * (1 - 0.03 * (r % 5)), seconds[0], seed)
            write_wav(root / "train" / "train" / kaggle_name(lang, "m", f"{lang}{r}"), x, RATE)
        for r in range(test.get(lang, 0)):
            seed += 1
            x = band_noise(lo * (1.02 + 0.03 * r), hi * (0.99 - 0.02 * r), seconds[1], 1000 + seed)
            write_wav(root / "test" / "test" / kaggle_name(lang, "f", f"{lang}t{r}"), x, RATE)
    return root


@pytest.fixture(scope="module")
def store(ray_local, tmp_path_factory):
    """The separable store, preprocessed once for the module; (store path, corpus root)."""
    from langid.preprocess import run_preprocess

    base = tmp_path_factory.mktemp("separable")
    corpus = make_corpus(base / "corpus", {k: TRAIN_RECORDINGS for k in BANDS}, {k: TEST_RECORDINGS for k in BANDS})
    res = run_preprocess(str(corpus), str(base / "store"), CFG, batch_size=16, progress=False)
    n_files = len(BANDS) * (TRAIN_RECORDINGS + TEST_RECORDINGS)
    assert (res.ok, res.failed) == (n_files, 0), res.errors
    return base / "store", corpus


def corpus_test_files(corpus: Path) -> list[Path]:
    return sorted((corpus / "test" / "test").glob("*.flac"))


def read_history(model_dir: Path) -> list[dict]:
    with open(model_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def expected_epochs(stages: list[Stage]) -> list[tuple[str, int]]:
    return [(s.name, e) for s in stages for e in range(1, s.epochs + 1)]


# ---------- 1. the stage schedule on the optimizer ----------

def _bn_param_ids(model: nn.Module) -> set[int]:
    norm = (nn.BatchNorm1d, nn.BatchNorm2d)
    return {id(p) for m in model.modules() if isinstance(m, norm) for p in m.parameters(recurse=False)}


def _tiny_learner(tmp_path, n_classes=3, n=16):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader

    X = torch.from_numpy(rng.random((n, 1, CFG.n_mels, CFG.window_frames)).astype(np.float32))
    examples = list(zip(X, torch.arange(n) % n_classes))
    model = LangIdNet("resnet18", n_classes)
    dls = DataLoaders(DataLoader(examples, bs=8, shuffle=True, drop_last=True), DataLoader(examples[:8], bs=8),
                      device=torch.device("cpu"))
    return model, make_learner(model, dls, str(tmp_path))


def test_layer_groups_cover_every_parameter_once():
    model = LangIdNet("resnet18", 3)
    groups = layer_groups(model)
    assert len(groups) == 3 and all(groups)
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert {id(p) for p in groups[2]} == {id(p) for p in model.head.parameters()}
    assert {id(p) for p in groups[0]} == {id(p) for p in model.body[0].parameters()} | \
        {id(p) for m in model.body[1:6] for p in m.parameters()}
    # through DistributedDataParallel's `.module` as well
    wrapped = nn.Module()
    wrapped.module = model
    assert [[id(p) for p in g] for g in layer_groups(wrapped)] == [[id(p) for p in g] for g in groups]


def test_stage_schedule_sets_freezing_and_learning_rates(tmp_path):
    model, learn = _tiny_learner(tmp_path)
    head, body = model.head, model.body
    bn = _bn_param_ids(model)
    head_ids = {id(p) for p in head.parameters()}
    body_params = list(body.parameters())
    body_bn = [p for p in body_params if id(p) in bn]
    body_other = [p for p in body_params if id(p) not in bn]
    assert body_bn and body_other

    stages = default_schedule()  # lrs 1e-2, 1e-3, 1e-4; divisors 9, 6, 1
    lr2 = stages[1].lr

    def groups():
        return [[id(p) for p in g] for g in learn.opt.param_lists]

    def lrs():
        return [h["lr"] for h in learn.opt.hypers]

    # stage 1: head trains, the body is frozen except its BatchNorm layers (fastai's train_bn)
    assert apply_stage(learn, stages[0]) == [1e-2, 1e-2, 1e-2]
    assert groups() == [[id(p) for p in g] for g in layer_groups(model)]
    assert lrs()[2] == 1e-2 and lrs() == [1e-2] * 3
    assert all(p.requires_grad for p in head.parameters())
    assert all(p.requires_grad for p in body_bn)
    assert not any(p.requires_grad for p in body_other)
    assert {id(p) for g in learn.opt.param_lists for p in g if p.requires_grad} == head_ids | {id(p) for p in body_bn}

    # a real step in the frozen stage moves the head and the BatchNorm layers, never the frozen convolutions
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    learn.fit(1, lr=stages[0].lrs())
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[id(p)] for p in body_other}.isdisjoint(changed)
    assert {names[i] for i in head_ids if "weight" in names[i]} <= changed
    assert any(names[id(p)] in changed for p in body_bn)

    # stage 2: everything trains, discriminative rates lr/9, lr/6, lr
    assert apply_stage(learn, stages[1]) == [lr2 / 9, lr2 / 6, lr2]
    assert lrs() == [lr2 / 9, lr2 / 6, lr2]
    assert all(p.requires_grad for p in model.parameters())
    assert groups() == [[id(p) for p in g] for g in layer_groups(model)]

    # stage 3: frozen again, lr 1e-4
    apply_stage(learn, stages[2])
    assert lrs()[2] == 1e-4 and lrs() == [1e-4] * 3
    assert all(p.requires_grad for p in head.parameters()) and all(p.requires_grad for p in body_bn)
    assert not any(p.requires_grad for p in body_other)

    # a custom schedule's numbers go through unchanged
    custom = default_schedule((1, 1, 1), (3e-3, 6e-4, 2e-5), (10.0, 4.0, 2.0))
    assert apply_stage(learn, custom[1]) == [6e-4 / 10, 6e-4 / 4, 6e-4 / 2] == lrs()
    assert apply_stage(learn, custom[0]) == [3e-3] * 3 == lrs()


# ---------- 2. it learns ----------

@pytest.mark.slow
def test_training_learns_the_separable_corpus(store, tmp_path):
    from langid import load_model as load_identifier
    from langid.evaluation import evaluate

    store_dir, corpus = store
    # from random initialisation, 4 epochs at 2e-3 left some store orders at 0.67 (shard names, hence order,
    # follow the temporary path); 5e-3 reached 1.0 on every order tried
    stages = default_schedule((1, 4, 1), (1e-2, 5e-3, 1e-4))
    out = tmp_path / "model"
    res = run_training(TrainConfig(store=str(store_dir), output=str(out), workers=1, arch="resnet18", stages=stages,
                                   batch_size=8, max_failures=0), pretrained=False)
    assert res["labels"] == sorted(BANDS)
    assert [(h["stage"], h["epoch"]) for h in res["history"]] == expected_epochs(stages)
    assert res["best"]["head-again"]["accuracy"] >= 0.9  # validation split

    report = evaluate(str(out), str(store_dir), str(tmp_path / "report"), progress=False)
    assert report["files"] == len(BANDS) * TEST_RECORDINGS
    assert report["accuracy"] >= 0.9, report["confusion_matrix"]

    # and on the raw audio, through the prediction API
    ident = load_identifier(str(out), device="cpu")
    files = corpus_test_files(corpus)
    preds = ident.predict_many([str(p) for p in files])
    truth = [p.name[:2] for p in files]
    assert np.mean([p.language == t for p, t in zip(preds, truth)]) >= 0.9, [p.language for p in preds]


# ---------- 3. two workers ----------

@pytest.mark.slow
def test_two_worker_run_exports_a_complete_model_folder(store, tmp_path):
    import langid
    from PIL import Image

    store_dir, corpus = store
    stages = default_schedule((1, 2, 1), (1e-2, 2e-3, 1e-4))
    out = tmp_path / "model2"
    tc = TrainConfig(store=str(store_dir), output=str(out), workers=2, arch="resnet18", stages=stages, batch_size=8,
                     max_failures=0)
    res = run_training(tc, pretrained=False)
    assert res["output"] == str(out)

    model, meta = load_network(str(out))
    assert isinstance(model, LangIdNet) and not model.training
    assert meta["labels"] == sorted(BANDS) and meta["architecture"] == "resnet18"
    assert meta["feature_config"] == CFG
    raw = json.loads((out / META_FILE).read_text())
    assert raw["labels"] == sorted(BANDS)
    assert FeatureConfig.from_dict(raw["feature_config"]) == CFG
    assert raw["architecture"] == "resnet18"
    assert raw["schedule"] == json.loads(json.dumps([asdict(s) for s in stages]))
    assert raw["training"]["workers"] == 2
    valid = raw["metrics"]["valid"]
    assert 0.0 <= valid["accuracy"] <= 1.0 and valid["valid_loss"] >= 0 and valid["epoch"] == 1
    assert raw["metrics"]["valid"] == raw["best_per_stage"]["head-again"]

    ident = langid.load_model(str(out), device="cpu")
    assert ident.labels == sorted(BANDS) and ident.cfg == CFG
    p = ident.predict(str(corpus_test_files(corpus)[0]))
    assert p.status == "ok" and p.language in BANDS
    assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)

    hist = read_history(out)
    assert [(h["stage"], int(h["epoch"])) for h in hist] == expected_epochs(stages)
    assert [int(h["global_epoch"]) for h in hist] == list(range(1, len(hist) + 1))
    assert [int(h["stage_index"]) for h in hist] == [1, 2, 2, 3]
    for h in hist:
        assert all(np.isfinite(float(h[k])) for k in ("train_loss", "valid_loss", "accuracy", "lr"))

    png = (out / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(out / "training_curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100

    for s in stages:
        folder = out / "stages" / s.name
        assert (folder / WEIGHTS_FILE).is_file(), folder
        m, stage_meta = load_network(str(folder))
        assert stage_meta["labels"] == sorted(BANDS)
        assert stage_meta["metrics"]["valid"] == raw["best_per_stage"][s.name]
    # the model folder's weights are the last stage's best
    last, _ = load_network(str(out / "stages" / "head-again"))
    for (k, a), b in zip(model.state_dict().items(), last.state_dict().values()):
        assert torch.equal(a, b), k
    # nothing pickled, nothing temporary left in the model folder
    assert not [f for f in os.listdir(out) if f.endswith((".pt", ".pkl", ".pth", ".tmp"))]


# ---------- 4. resume after the job is killed ----------

def _train_cmd(store_dir: Path, out: Path, address: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "train.py"), "--store", str(store_dir), "--output", str(out),
            "--arch", "resnet18", "--epochs", "2,3,1", "--lr", "1e-2,2e-3,1e-4", "--batch-size", "8",
            "--workers", "1", "--no-pretrained", "--max-failures", "0", "--no-gpu", "--address", address]


def _latest_checkpoint(out: Path):
    """The checkpoint Ray Train's snapshot names as latest (what a rerun resumes from), or None."""
    snap = out / "ray" / "train" / "checkpoint_manager_snapshot.json"
    try:
        state = json.loads(snap.read_text())
    except (OSError, ValueError):
        return None
    latest = state.get("latest_checkpoint_result")
    if not latest:
        return None
    folder = out / "ray" / "train" / latest["checkpoint_dir_name"]
    return folder if (folder / "state.json").is_file() else None


@pytest.mark.slow
def test_killed_training_resumes_from_its_checkpoint(ray_local, store, tmp_path):
    """The job's driver is killed with everything it started; the rerun resumes from the last checkpoint.

    Both runs join the session's Ray (--address), as jobs submitted to a cluster do (two embedded Ray
    instances on one machine confuse Ray's own helpers: "Found multiple active Ray instances"). The
    kill takes the driver's whole process group; Ray then ends the dead job's controller and workers.
    """
    store_dir, _ = store
    out = tmp_path / "model"
    stages = default_schedule((2, 3, 1), (1e-2, 2e-3, 1e-4))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = _train_cmd(store_dir, out, ray_local.get_runtime_context().gcs_address)

    log1 = open(tmp_path / "first.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            # the first checkpoint folder, and Ray Train's record of it (written once the upload is complete)
            if list((out / "ray" / "train").glob("checkpoint_*")) and _latest_checkpoint(out):
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.1)
        else:
            pytest.fail("no checkpoint within 300 s:\n" + (tmp_path / "first.log").read_text())
        assert proc.poll() is None, "the job finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        log1.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / META_FILE).exists()  # killed before the export

    ckpt = _latest_checkpoint(out)
    assert ckpt is not None
    done = json.loads((ckpt / "state.json").read_text())
    done_rows = done["history"]
    total = sum(s.epochs for s in stages)
    assert 1 <= len(done_rows) < total

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=600)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output
    assert "resuming from checkpoint" in output, output
    stage_no, epochs_done = done["stage"] + 1, done["epoch"]
    assert f"resuming from checkpoint: stage {stage_no}, {epochs_done} epochs done in it" in output, output

    def epoch_line(stage_index: int, epoch: int) -> str:  # what the worker prints after each epoch
        st = stages[stage_index - 1]
        return f"stage {stage_index}/{len(stages)} ({st.name}) epoch {epoch}/{st.epochs}: "

    for d in done_rows:  # no checkpointed epoch is trained again...
        assert epoch_line(d["stage_index"], d["epoch"]) not in output, output
    names = [s.name for s in stages]
    for name, epoch in expected_epochs(stages)[len(done_rows):]:  # ...and each of the others is trained once,
        assert second.stdout.count(epoch_line(names.index(name) + 1, epoch)) == 1, output  # told once
    # rank 0's lines reach the terminal through the driver; Ray Train's own lines stay in Ray's logs
    for internal in ("TrainingReport", "RayTrainWorker", "pid=", "Checkpoint"):
        assert internal not in output, output

    hist = read_history(out)
    keys = [(h["stage"], int(h["epoch"])) for h in hist]
    assert keys == expected_epochs(stages)  # each (stage, epoch) exactly once, in order
    assert len(set(keys)) == len(keys) == total
    assert [int(h["global_epoch"]) for h in hist] == list(range(1, total + 1))
    # the epochs done before the kill are the checkpoint's own rows, not recomputed ones
    for h, d in zip(hist, done_rows):
        assert float(h["train_loss"]) == pytest.approx(d["train_loss"], rel=1e-6)
        assert float(h["valid_loss"]) == pytest.approx(d["valid_loss"], rel=1e-6)
    model, meta = load_network(str(out))
    assert meta["labels"] == sorted(BANDS)


# ---------- 5. the model artifact ----------

def _with_bn_statistics(model: LangIdNet, seed: int = 0) -> LangIdNet:
    """Random weights and non-default BatchNorm statistics, so a lossy save/load would show."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 1, CFG.n_mels, CFG.window_frames, generator=g))
        for p in model.head.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_save_then_load_gives_identical_predictions(tmp_path):
    import langid

    torch.manual_seed(1)
    model = _with_bn_statistics(LangIdNet("resnet18", 3))
    labels = ["aa", "bb", "cc"]
    save_model(model, str(tmp_path / "m"), labels, CFG, {"schedule": [asdict(s) for s in default_schedule()]})
    assert sorted(os.listdir(tmp_path / "m")) == [META_FILE, WEIGHTS_FILE]

    loaded, meta = load_network(str(tmp_path / "m"))
    assert not loaded.training
    assert meta["labels"] == labels and meta["feature_config"] == CFG and meta["architecture"] == "resnet18"
    assert meta["schedule"][1]["lr_divisors"] == [9.0, 6.0, 1.0]
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

    x = torch.rand(5, 1, CFG.n_mels, CFG.window_frames, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(x), loaded(x)
    assert torch.equal(want, got)
    assert want.shape == (5, 3) and want.std() > 0

    reference = langid.load_model(str(tmp_path / "m"), device="cpu", backend="torch")
    np.testing.assert_array_equal(reference.logprobs(x[:, 0].numpy()), torch.log_softmax(want, dim=1).numpy())
    ident = langid.load_model(str(tmp_path / "m"), device="cpu")  # ONNX Runtime: the same within float rounding
    np.testing.assert_allclose(ident.logprobs(x[:, 0].numpy()), torch.log_softmax(want, dim=1).numpy(), atol=1e-5)


def _saved(tmp_path, name="m") -> Path:
    folder = tmp_path / name
    save_model(LangIdNet("resnet18", 2), str(folder), ["aa", "bb"], CFG)
    return folder


class _Trap:
    """Unpickling this creates a marker folder: proof that a loader unpickled the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_load_refuses_pickled_weights(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Trap(str(marker)))

    # a langid model.json beside a pickle instead of safetensors
    folder = _saved(tmp_path)
    (folder / WEIGHTS_FILE).unlink()
    (folder / "model.pt").write_bytes(payload)
    with pytest.raises(ModelError) as ei:
        load_network(str(folder))
    msg = str(ei.value)
    assert WEIGHTS_FILE in msg and "model.pt" in msg and "pickle" in msg
    assert "\n" not in msg

    # a folder with nothing but a pickle
    only = tmp_path / "only-pickle"
    only.mkdir()
    (only / "model.pt").write_bytes(payload)
    with pytest.raises(ModelError, match="no model.json"):
        load_network(str(only))
    assert not marker.exists()

    # a pickle renamed to model.safetensors is refused as unreadable weights, never unpickled
    disguised = _saved(tmp_path, "disguised")
    (disguised / WEIGHTS_FILE).write_bytes(payload)
    with pytest.raises(ModelError, match="weights"):
        load_network(str(disguised))
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    ({"labels": []}, "'labels' must be a non-empty list of distinct strings"),
    ({"labels": ["aa", "aa"]}, "'labels' must be a non-empty list of distinct strings"),
    ({"labels": ["aa", 3]}, "'labels' must be a non-empty list of distinct strings"),
    ({"labels": ["aa", ""]}, "'labels' must be a non-empty list of distinct strings"),
    ({"labels": "aa,bb"}, "'labels' must be a non-empty list of distinct strings"),
    ({"labels": None}, "'labels' must be a non-empty list of distinct strings"),
    ({"architecture": "resnet9"}, "unknown architecture 'resnet9'"),
    ({"architecture": None}, "unknown architecture None"),
    ({"feature_config": {**CFG.to_dict(), "n_mfcc": 13}}, "bad feature_config (unknown feature-config keys: ['n_mfcc'])"),
    ({"feature_config": {**CFG.to_dict(), "n_mels": "32"}}, "bad feature_config"),
    ({"feature_config": {**CFG.to_dict(), "fmax": 1e6}}, "bad feature_config"),
    ({"format_version": 99}, "format_version 99"),
    ({"labels": ["aa", "bb", "cc"]}, "weights do not fit the metadata"),  # 3 labels, a 2-class head
    ({"architecture": "resnet34"}, "weights do not fit the metadata"),
])
def test_load_refuses_bad_metadata(tmp_path, change, message):
    folder = _saved(tmp_path)
    meta = json.loads((folder / META_FILE).read_text())
    meta.update(change)
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelError) as ei:
        load_network(str(folder))
    assert message in str(ei.value)
    assert "\n" not in str(ei.value)


def test_load_refuses_missing_or_unreadable_metadata(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        load_network(str(tmp_path / "nowhere"))
    folder = _saved(tmp_path)
    (folder / META_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="unreadable metadata"):
        load_network(str(folder))
    (folder / META_FILE).write_text("[1, 2]")
    with pytest.raises(ModelError, match="must be a JSON object"):
        load_network(str(folder))


def test_rerun_with_other_settings_is_refused(tmp_path):
    """A rerun resumes from OUTPUT's checkpoint, so it must not silently mix two different runs."""
    from dataclasses import replace

    from langid.training import TrainConfig, check_run_settings

    tc = TrainConfig(store="/some/store", output=str(tmp_path), arch="resnet18")
    check_run_settings(str(tmp_path), tc, ["de", "en"])
    check_run_settings(str(tmp_path), tc, ["de", "en"])  # same settings: fine, resumes
    with pytest.raises(ValueError, match="arch"):
        check_run_settings(str(tmp_path), replace(tc, arch="resnet34"), ["de", "en"])
    with pytest.raises(ValueError, match="labels"):
        check_run_settings(str(tmp_path), tc, ["de", "en", "es"])
