"""The `langid` command in this process: flag types, user errors as one line (exit status 2), bugs with their
traceback, and `train --lr-find`."""
from __future__ import annotations

import argparse
import re

import pytest

from langid.cli import build_parser, main, memory_size
from langid.config import FeatureConfig
from langid.errors import BadValue

TRAIN = ["train", "--store", "store", "--output", "model"]


@pytest.mark.parametrize("text, value", [("0", 0), ("512M", 512 << 20), ("4G", 4 << 30), ("1.5GiB", 3 << 29),
                                         ("2k", 2048), ("1000", 1000)])
def test_memory_sizes(text, value):
    assert memory_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "four", "-1G", "nan", "inf", "1X"])
def test_bad_memory_sizes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        memory_size(text)


def test_comma_lists_are_parsed_by_their_flags():
    a = build_parser().parse_args([*TRAIN, "--epochs", "2, 3,1.0", "--lr", "1e-3/4,1e-3,0", "--lr-divisors", "9,6,1"])
    assert (a.epochs, a.lr, a.lr_divisors) == ([2, 3, 1], [2.5e-4, 1e-3, 0.0], [9.0, 6.0, 1.0])
    assert all(type(e) is int for e in a.epochs)
    assert build_parser().parse_args(TRAIN).epochs == [7, 12, 8]
    assert build_parser().parse_args(["predict", "a.wav", "--model", "m", "--languages", " en, de,"]).languages == \
        ["en", "de"]
    assert build_parser().parse_args(["predict", "a.wav", "--model", "m"]).languages is None


@pytest.mark.parametrize("flag, text, words", [
    ("--epochs", "1.5,1,1", "epochs are whole numbers, got 1.5,1,1"),  # was silently 1
    ("--epochs", "0,0,0", "at least one stage needs an epoch"),
    ("--epochs", "1,1", "takes three comma-separated values (one per stage), got 2"),
    ("--epochs", "-1,1,1", "takes values >= 0, got -1,1,1"),
    ("--lr", "1e-2,x,1e-4", "expected comma-separated numbers, got '1e-2,x,1e-4'"),
    ("--lr", "1e-2,nan,1e-4", "takes values >= 0, got 1e-2,nan,1e-4"),
    ("--lr-divisors", "9,0,1", "takes values > 0, got 9,0,1"),
])
def test_bad_comma_lists_are_usage_errors(capsys, flag, text, words):
    with pytest.raises(SystemExit) as ei:
        main([*TRAIN, f"{flag}={text}"])  # = : a value may start with -
    assert ei.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"langid train: error: argument {flag}: {words}"


def test_label_actor_threads_default_to_twice_the_reserved_cpus(capsys):
    from langid.labeling import LabelJob, actor_threads

    label = ["label", "--model", "m", "--input", "in", "--output", "out.csv"]
    a = build_parser().parse_args(label)
    assert actor_threads(LabelJob("m", "in", "out.csv", threads_per_actor=a.threads_per_actor,
                                  cpus_per_actor=a.cpus_per_actor)) == 2
    assert actor_threads(LabelJob("m", "in", "out.csv", cpus_per_actor=0.5)) == 2
    assert actor_threads(LabelJob("m", "in", "out.csv", cpus_per_actor=4)) == 8
    assert build_parser().parse_args([*label, "--threads-per-actor", "3"]).threads_per_actor == 3
    with pytest.raises(SystemExit):
        main([*label, "--threads-per-actor=-1"])
    assert "argument --threads-per-actor: must be at least 0, got -1" in capsys.readouterr().err


def _fail_loading(monkeypatch, error: Exception) -> list[str]:
    """`langid predict` whose model loading raises `error`."""
    import langid.inference

    def load_model(*args, **kwargs):
        raise error

    monkeypatch.setattr(langid.inference, "load_model", load_model)
    return ["predict", "a.wav", "--model", "m"]


def test_a_user_error_is_one_line_with_exit_status_2(monkeypatch, capsys):
    assert main(_fail_loading(monkeypatch, BadValue("m: the fix is to do it right"))) == 2
    assert capsys.readouterr().err == "langid predict: error: m: the fix is to do it right\n"


def test_a_missing_model_folder_is_one_line(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "a.wav"), "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("langid predict: error:") and err.count("\n") == 1 and "no-model" in err


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """A ValueError that is not one of langid's user errors is a bug: it leaves main, traceback and all."""
    with pytest.raises(ValueError, match="a bug"):
        main(_fail_loading(monkeypatch, ValueError("a bug")))
    assert "error:" not in capsys.readouterr().err


@pytest.mark.slow
def test_lr_find_writes_its_plot_and_prints_the_valley(ray_local, tmp_path, capsys):
    """`train --lr-find` runs fastai's finder here on a small generated store; nothing is trained."""
    from support.generated_store import write_store

    write_store(str(tmp_path / "store"), train=800, valid=8, cfg=FeatureConfig(window_seconds=0.5, n_mels=16))
    assert main(["train", "--store", str(tmp_path / "store"), "--output", str(tmp_path / "model"), "--lr-find",
                 "--arch", "resnet18", "--no-pretrained", "--batch-size", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"^suggested learning rate \(valley\): (\S+); plot: (\S+)$", out, re.M)
    assert found, out
    valley, plot = float(found.group(1)), found.group(2)
    assert 1e-7 <= valley <= 10  # the range fastai's finder sweeps
    assert plot == str(tmp_path / "model" / "lr_find.png")
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["lr_find.png"]
