"""The ONNX Runtime backend: the same answers as torch, model.onnx exported once and kept current, read-only folders
exported into the cache. Random-weight models: agreement does not depend on training."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, tone, write_wav
from langid import onnxmodel
from langid.config import FeatureConfig
from langid.inference import load_model
from langid.artifact import save_model
from langid.model import LangIdNet
from langid.onnxmodel import ONNX_FILE, SHA_KEY, weights_sha256

LABELS = ["aa", "bb", "cc"]
CFG = FeatureConfig(sample_rate=16000, window_seconds=1.0, n_mels=32)
ENCODER_CFG = FeatureConfig(sample_rate=16000, n_fft=400, hop_length=160, n_mels=80, fmin=0.0, fmax=8000.0,
                            frontend="whisper-encoder", whisper="base", embed_dim=512)
TOL = 1e-4


def random_model(folder: Path, arch: str = "resnet18", cfg: FeatureConfig = CFG, seed: int = 0,
                 temperature: float = 1.7) -> Path:
    """A model with BatchNorm statistics of its own (the default ones make a random resnet's logits explode) and a
    calibration temperature, saved as training saves it."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LangIdNet(arch, len(LABELS), input_shape=cfg.shape)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.rand(8, 1, *cfg.shape, generator=g))
    save_model(model.eval(), str(folder), LABELS, cfg, {"calibration": {"temperature": temperature}})
    return folder


def windows(cfg: FeatureConfig, n: int = 37, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *cfg.shape), dtype=np.float32)


def assert_agree(a: np.ndarray, b: np.ndarray) -> None:
    """Same argmax, log-probabilities and probabilities within TOL."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a.argmax(1), b.argmax(1))
    np.testing.assert_allclose(np.exp(a), np.exp(b), rtol=0, atol=TOL)
    np.testing.assert_allclose(a, b, rtol=0, atol=TOL)


def identity(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def exported_sha(ident) -> str:
    return ident.session.get_modelmeta().custom_metadata_map[SHA_KEY]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One thread for both backends (both take OMP_NUM_THREADS): on a shared machine, spinning threads waiting for
    a busy core make a test of seconds take a minute."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_onnx_on_cpu_never_imports_torch(tmp_path):
    """Labeling actors, the label job's driver (its check of the model) and `langid predict` on CPU load no torch
    (seconds per process, and again at exit): the metadata, the weights' hash and the session need none once
    model.onnx is current."""
    folder = random_model(tmp_path / "m")
    load_model(str(folder), "cpu")  # exports model.onnx beside the weights
    clip = tmp_path / "a.wav"
    write_wav(clip, tone(440.0, 2.0, CFG.sample_rate), CFG.sample_rate)
    code = ("import sys, langid\n"
            "from langid.inference import describe_model\n"
            f"assert describe_model({str(folder)!r})['labels'] == {LABELS!r}\n"
            f"p = langid.load_model({str(folder)!r}, 'cpu').predict({str(clip)!r})\n"
            "assert p.status == 'ok' and p.language in {'aa', 'bb', 'cc'}, p\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LANGID_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_export(monkeypatch):
    """Any export from here on fails the test: what follows must reuse a file."""
    def fail(*a, **kw):
        raise AssertionError("exported again")

    def arm():
        monkeypatch.setattr(onnxmodel, "export_onnx", fail)

    return arm


@pytest.mark.parametrize("arch,cfg", [("resnet18", CFG), ("mlp", CFG), ("mlp", ENCODER_CFG)],
                         ids=["resnet18", "mlp-logmel", "mlp-encoder"])
def test_onnx_agrees_with_torch_on_windows(tmp_path, cache, arch, cfg):
    folder = random_model(tmp_path / "m", arch, cfg)
    onnx, ref = load_model(str(folder), "cpu", backend="onnx"), load_model(str(folder), "cpu", backend="torch")
    assert (onnx.backend, ref.backend) == ("onnx", "torch")
    assert (onnx.labels, onnx.cfg, onnx.temperature) == (ref.labels, ref.cfg, ref.temperature) == (LABELS, cfg, 1.7)
    x = windows(cfg)
    x.flags.writeable = False  # as a store's columns and the labeling job's buffers are
    for batch in (None, 1, 8, 64):
        assert_agree(onnx.logprobs(x, batch), ref.logprobs(x.copy(), batch))
    assert onnx.logprobs(x[:0]).shape == (0, len(LABELS))
    assert len(set(onnx.logprobs(x).argmax(1))) > 1  # the comparison means something: not one class everywhere


@pytest.mark.parametrize("arch", ["resnet18", "mlp"])
def test_predict_many_agrees(tmp_path, cache, arch):
    folder = random_model(tmp_path / "m", arch)
    onnx, ref = load_model(str(folder), "cpu"), load_model(str(folder), "cpu", backend="torch")
    assert onnx.backend == "onnx"  # the default for a trained model
    audio = [tone(f, s, 22050, seed=i) for i, (f, s) in enumerate([(200, 0.4), (900, 1.0), (2500, 2.7), (440, 5.3)])]
    audio.append(np.zeros(22050, np.float32))  # silence: no speech window, "unknown"
    got, want = (i.predict_many(audio, sample_rate=22050, top_k=3) for i in (onnx, ref))
    assert [p.windows for p in got] == [p.windows for p in want] == [1, 1, 3, 5, 1]
    for g, w in zip(got, want):
        assert (g.language, g.status, g.error, g.windows_used) == (w.language, w.status, w.error, w.windows_used)
        assert g.confidence == pytest.approx(w.confidence, abs=TOL)
        assert g.probabilities.keys() == w.probabilities.keys()
        assert all(g.probabilities[k] == pytest.approx(w.probabilities[k], abs=TOL) for k in w.probabilities)
        assert [s.language for s in g.segments] == [s.language for s in w.segments]
    assert got[-1].language == "unknown"


def test_export_on_first_use_is_atomic_and_reused(tmp_path, cache, monkeypatch, no_export):
    folder = random_model(tmp_path / "m", "mlp")  # the mlp from here on: the same files, exported in a tenth the time
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(onnxmodel.os, "replace", lambda a, b: (renames.append((a, b)), real_replace(a, b))[1])
    first = load_model(str(folder), "cpu")
    path = folder / ONNX_FILE
    assert first.onnx_path == str(path)
    assert sorted(os.listdir(folder)) == ["model.json", ONNX_FILE, "model.safetensors"]  # no temporary left behind
    [(src, dst)] = renames  # written under a hidden name beside the target, then renamed over it
    assert os.path.dirname(src) == str(folder) and os.path.basename(src).startswith(".") and dst == str(path)
    assert exported_sha(first) == weights_sha256(str(folder / "model.safetensors"))
    assert not cache.exists()  # a writable folder keeps its own
    before = identity(path)
    no_export()
    second = load_model(str(folder), "cpu")
    assert identity(path) == before and second.onnx_path == str(path)
    assert_agree(second.logprobs(windows(CFG)), first.logprobs(windows(CFG)))


def test_stale_or_broken_onnx_is_exported_again(tmp_path, cache):
    folder = random_model(tmp_path / "m", "mlp", seed=0)
    old = load_model(str(folder), "cpu")
    before = identity(folder / ONNX_FILE)
    random_model(folder, "mlp", seed=1)  # retrained: new weights, the old model.onnx left beside them
    new, ref = load_model(str(folder), "cpu"), load_model(str(folder), "cpu", backend="torch")
    assert identity(folder / ONNX_FILE) != before
    assert exported_sha(new) == weights_sha256(str(folder / "model.safetensors")) != exported_sha(old)
    x = windows(CFG)
    assert_agree(new.logprobs(x), ref.logprobs(x))
    assert not np.allclose(old.logprobs(x), new.logprobs(x), atol=1e-3)

    (folder / ONNX_FILE).write_bytes(b"half a file")  # an interrupted copy
    again = load_model(str(folder), "cpu")
    assert (folder / ONNX_FILE).stat().st_size > 1000 and exported_sha(again) == exported_sha(new)
    assert_agree(again.logprobs(x), ref.logprobs(x))


def test_read_only_folder_exports_into_the_cache(tmp_path, cache, monkeypatch, no_export):
    folder = random_model(tmp_path / "m", "mlp")
    sha = weights_sha256(str(folder / "model.safetensors"))
    real_write = onnxmodel.write_atomic

    def write(fs, path, data):  # as root, permissions do not stop a write: refuse as a read-only file system would
        if os.path.dirname(path) == str(folder):
            raise PermissionError(13, "Permission denied", path)
        real_write(fs, path, data)

    monkeypatch.setattr(onnxmodel, "write_atomic", write)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        ident = load_model(str(folder), "cpu")
        cached = cache / "onnx" / f"{sha}.onnx"
        assert ident.onnx_path == str(cached) and cached.exists()
        assert sorted(os.listdir(folder)) == ["model.json", "model.safetensors"]
        assert sorted(os.listdir(cached.parent)) == [cached.name]
        x = windows(CFG)
        assert_agree(ident.logprobs(x), load_model(str(folder), "cpu", backend="torch").logprobs(x))
        before = identity(cached)
        no_export()
        assert load_model(str(folder), "cpu").onnx_path == str(cached) and identity(cached) == before
        # a URI's local copy is per process: its export goes to the cache too (here, the one already there)
        assert load_model(folder.as_uri(), "cpu").onnx_path == str(cached)
    finally:
        folder.chmod(stat.S_IRWXU)


@pytest.mark.slow  # two fresh Python processes
def test_concurrent_first_use(tmp_path, cache):
    """Several processes (Ray actors) loading an unexported model at once: all load, one valid model.onnx."""
    folder = random_model(tmp_path / "m", "mlp")
    code = ("import sys, numpy as np; from langid.inference import load_model; "
            "i = load_model(sys.argv[1], 'cpu'); print(i.onnx_path, float(np.exp(i.logprobs(np.ones((1, 32, 101), "
            "np.float32))).max()))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert {o[0] for o in outs} == {str(folder / ONNX_FILE)} and len({o[1] for o in outs}) == 1
    assert sorted(os.listdir(folder)) == ["model.json", ONNX_FILE, "model.safetensors"]
    ident = load_model(str(folder), "cpu")
    assert exported_sha(ident) == weights_sha256(str(folder / "model.safetensors"))


@pytest.mark.parametrize("model", ["trained", "whisper:base"])
def test_unknown_backend_is_a_one_line_error(tmp_path, model):
    path = str(random_model(tmp_path / "m", "mlp")) if model == "trained" else model
    with pytest.raises(ValueError, match="^unknown backend 'tensorrt'; choose one of onnx, torch$"):
        load_model(path, "cpu", backend="tensorrt")


def test_cli_backend_flag(tmp_path, cache, capsys):
    from langid.cli import build_parser, main

    folder = random_model(tmp_path / "m", "mlp")
    wav = write_wav(tmp_path / "a.wav", tone(700, 2.5, 16000), 16000)
    answers = {}
    for backend in ("onnx", "torch"):
        assert main(["predict", str(wav), "--model", str(folder), "--backend", backend, "--json"]) == 0
        answers[backend] = json.loads(capsys.readouterr().out)[0]
    assert answers["onnx"]["language"] == answers["torch"]["language"]
    assert answers["onnx"]["confidence"] == pytest.approx(answers["torch"]["confidence"], abs=TOL)
    args = build_parser().parse_args(["evaluate", "--model", "m", "--store", "s", "--output", "o"])
    assert args.backend == "onnx" and args.batch_size is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "a.wav", "--model", "m", "--backend", "tensorrt"])
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_session_threads_sleep_instead_of_spinning():
    """A label actor's threads share their cores with decoding tasks: idle ones must yield the CPU."""
    from langid.onnxmodel import session_options

    so = session_options(2)
    assert so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
