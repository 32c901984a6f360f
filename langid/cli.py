"""The `langid` command: thin argument parsing over the library; each job in jobs/ calls into it."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from langid.config import ARCHITECTURES, MAX_SECONDS, FeatureConfig
from langid.errors import UserError

PATH_ERRORS = (FileNotFoundError, NotADirectoryError, PermissionError)  # on paths the user gave: one line too


def _add_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray")
    g.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start Ray embedded)")
    g.add_argument("--num-cpus", type=int, help="CPUs for embedded Ray (default: all)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--verbose", action="store_true", help="also Ray's own log lines and warnings")


def _add_answer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--languages", type=_names, help="answer only among these, e.g. en,de")
    p.add_argument("--min-confidence", type=_probability, default=0.0, help="below this, the answer is 'unknown'")
    p.add_argument("--top-k", type=_positive_int, default=3,
                   help="languages listed with their probabilities (default %(default)s)")
    from langid.timeline import SWITCH_PENALTY

    def non_negative(text: str) -> float:
        v = float(text)
        if not v >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return v

    p.add_argument("--switch-penalty", type=non_negative, default=SWITCH_PENALTY,
                   help="cost of a language switch in the timeline (segments), in nats of log-probability: higher "
                        "absorbs more single-window flips, 0 keeps each window's own language (default %(default)s)")


MODEL_HELP = ("model folder written by train, or whisper:<size> (tiny, base, small, ...) or whisper:/path/to/folder "
              "for Whisper's own language detection")


BACKEND_HELP = ("how a trained model runs: onnx (ONNX Runtime, faster on CPU; model.onnx is exported beside the "
                "weights, or into the cache, on first use) or torch (PyTorch, the reference); Whisper models run on "
                "CTranslate2 either way (default %(default)s)")


def _add_backend_flag(p: argparse.ArgumentParser) -> None:
    from langid.inference import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default=BACKENDS[0], help=BACKEND_HELP)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    from langid.whisper import DEFAULT_WINDOW_SECONDS

    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--whisper-window", type=float, metavar="SECONDS",
                   help=f"Whisper models: seconds of audio per answer, at most 30 (default {DEFAULT_WINDOW_SECONDS:g})")


def _probability(text: str) -> float:
    v = float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return v


def int_at_least(minimum: int):
    """argparse type: a whole number >= minimum."""
    def parse(text: str) -> int:
        v = int(text)
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return v

    return parse


_positive_int = int_at_least(1)


def _add_feature_flags(p: argparse.ArgumentParser) -> None:
    d = FeatureConfig()
    g = p.add_argument_group("features (saved in the store; training and labeling reuse them)")
    g.add_argument("--sample-rate", type=int, default=d.sample_rate, help="target rate in Hz (default %(default)s)")
    g.add_argument("--window-seconds", type=float, default=d.window_seconds, help="window length (default %(default)s)")
    g.add_argument("--n-fft", type=int, default=d.n_fft, help="STFT size in samples (default %(default)s)")
    g.add_argument("--hop-length", type=int, default=d.hop_length, help="STFT hop in samples (default %(default)s)")
    g.add_argument("--n-mels", type=int, default=d.n_mels, help="mel bands (default %(default)s)")
    g.add_argument("--fmin", type=float, default=d.fmin, help="lowest mel frequency (default %(default)s)")
    g.add_argument("--fmax", type=float, default=d.fmax, help="highest mel frequency (default %(default)s)")
    g.add_argument("--frontend", default="logmel", metavar="{logmel,whisper-encoder:MODEL,whisper-mel:MODEL}",
                   help="logmel: langid's log-mel images (default); whisper-encoder:base: Whisper's encoder output, "
                        "pooled per window (a pretrained front-end for --arch mlp); whisper-mel:base: Whisper's own "
                        "log-mel (to evaluate whisper:base on the store). Whisper front-ends use --window-seconds only")


def _feature_config(a: argparse.Namespace) -> FeatureConfig:
    frontend, _, name = a.frontend.partition(":")
    if frontend != "logmel":
        from langid.whisper import feature_config, parse_spec

        if frontend not in ("whisper-mel", "whisper-encoder") or not name:
            raise UserError(f"--frontend {a.frontend}: use logmel, whisper-encoder:MODEL or whisper-mel:MODEL")
        return feature_config(frontend, parse_spec("whisper:" + name), a.window_seconds)
    return FeatureConfig(sample_rate=a.sample_rate, window_seconds=a.window_seconds, n_fft=a.n_fft,
                         hop_length=a.hop_length, n_mels=a.n_mels, fmin=a.fmin, fmax=a.fmax)


def cmd_preprocess(a: argparse.Namespace) -> int:
    from langid.preprocess import run_preprocess
    from langid.runtime import init_ray
    from langid.sources import ManifestOptions

    from langid.uris import exists

    cfg = _feature_config(a)
    manifest = ManifestOptions(a.min_confidence, a.group_by)
    if not exists(a.input):  # before Ray starts: a typo costs no start-up
        raise UserError(f"{a.input}: no such directory or manifest file")
    how = init_ray(a.address, a.num_cpus, verbose=a.verbose)
    if a.verbose:
        print(f"langid preprocess: {how}", file=sys.stderr)
    res = run_preprocess(a.input, a.output, cfg, a.format, a.valid_fraction, a.seed, a.png, a.batch_size,
                         a.cpus_per_task, a.max_seconds, progress=not a.quiet, split=a.split,
                         memory=a.memory_per_task, manifest=manifest)
    print(res.summary())
    for path, reason in res.errors[:10]:
        print(f"  failed: {path}: {reason}")
    if len(res.errors) > 10:
        print(f"  ... and {len(res.errors) - 10} more in {a.output}/errors")
    return 0


def memory_size(text: str) -> int:
    """argparse type: bytes, with an optional K/M/G/T suffix (powers of 1024), e.g. 4G."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 512M or 4G, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a size >= 0, got {text!r}")
    return int(value)


def _per_stage(positive: bool = False):
    """argparse type: three comma-separated numbers, one per stage (fractions such as 1e-3/3 too), each >= 0,
    or > 0 when `positive`."""
    def parse(text: str) -> list[float]:
        try:
            values = [_fraction(x) for x in text.split(",")]
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if len(values) != 3:
            raise argparse.ArgumentTypeError(f"takes three comma-separated values (one per stage), got {len(values)}")
        if not all(v > 0 if positive else v >= 0 for v in values):  # NaN too
            raise argparse.ArgumentTypeError(f"takes values {'>' if positive else '>='} 0, got {text}")
        return values

    return parse


def _fraction(x: str) -> float:
    num, _, den = x.strip().partition("/")
    return float(num) / float(den) if den else float(num)


def _epochs(text: str) -> list[int]:
    """argparse type: whole epochs per stage, three comma-separated, at least one stage with an epoch."""
    values = _per_stage()(text)
    if not all(v.is_integer() for v in values):
        raise argparse.ArgumentTypeError(f"epochs are whole numbers, got {text}")
    if not any(values):
        raise argparse.ArgumentTypeError("at least one stage needs an epoch")
    return [int(v) for v in values]


def cmd_train(a: argparse.Namespace) -> int:
    from langid.model import default_device
    from langid.runtime import init_ray
    from langid.training import TrainConfig, default_schedule, run_lr_find, run_training

    stages = default_schedule(a.epochs, a.lr, a.lr_divisors)
    tc = TrainConfig(store=a.store, output=a.output, arch=a.arch, stages=stages, batch_size=a.batch_size,
                     workers=a.workers, gpu=bool(a.gpu), amp=a.amp, cpus_per_worker=a.cpus_per_worker,
                     memory_per_worker=a.memory_per_worker, seed=a.seed, spec_augment=not a.no_spec_augment,
                     max_failures=a.max_failures, shuffle_buffer=a.shuffle_buffer)
    how = init_ray(a.address, a.num_cpus, verbose=a.verbose, dashboard=True)
    if a.lr_find:  # runs here, on this machine's device, streaming the store through Ray Data
        tc = replace(tc, gpu=default_device(a.gpu).type == "cuda")
        res = run_lr_find(tc, pretrained=not a.no_pretrained, weights_file=a.weights)
        print(f"suggested learning rate (valley): {res['valley']:.2e}; plot: {res['plot']}")
        return 0
    if a.gpu is None:  # the workers' GPUs are the cluster's, not this machine's: a cluster's head often has none
        import ray

        tc = replace(tc, gpu=ray.cluster_resources().get("GPU", 0) >= 1)
    gpu = tc.gpu  # --gpu on a cluster without GPUs yet: Ray waits for the autoscaler to start GPU nodes
    print(f"langid train: {how}; {a.workers} worker(s) on {'GPU' if gpu else 'CPU'}"
          f"{' with mixed precision' if tc.mixed_precision else ''}, {a.arch}", file=sys.stderr)
    res = run_training(tc, pretrained=not a.no_pretrained, weights_file=a.weights,
                       log=lambda m: print(f"langid train: {m}", file=sys.stderr),
                       progress=None if a.quiet else print)
    for name, b in res["best"].items():
        print(f"stage {name}: best validation accuracy {b['accuracy']:.4f} at epoch {b['epoch']}")
    print(f"model: {res['output']} (model.safetensors, model.onnx, model.json, history.csv, training_curves.png)")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from langid.evaluation import evaluate

    r = evaluate(a.model, a.store, a.output, a.split, a.batch_size, progress=not a.quiet,
                 window_seconds=a.whisper_window, languages=a.languages, backend=a.backend)
    low, high = r["accuracy_ci95"]
    eer = "n/a" if r["eer"] is None else f"{r['eer']:.4f}"
    print(f"{r['split']}: {r['files']} files, accuracy {r['accuracy']:.4f} (95% CI {low:.3f}-{high:.3f}), "
          f"macro F1 {r['macro_f1']:.4f}, Cavg {r['cavg']:.4f}, EER {eer}")
    print(f"report: {os.path.join(a.output, 'report.md')}")
    return 0


def cmd_label(a: argparse.Namespace) -> int:
    from langid.inference import check_languages, describe_model
    from langid.labeling import LabelJob, LabelOptions, label
    from langid.runtime import init_ray

    meta = describe_model(a.model, a.whisper_window, a.backend)  # a bad model or language fails before Ray starts
    check_languages(a.languages, meta["labels"])
    opts = LabelOptions(languages=a.languages, min_confidence=a.min_confidence, top_k=a.top_k,
                        overlap=a.overlap, probabilities=a.probabilities, max_seconds=a.max_seconds,
                        window_seconds=a.whisper_window, switch_penalty=a.switch_penalty)
    job = LabelJob(a.model, a.input, a.output, opts, segments=a.segments, parquet=a.parquet, all_files=a.all_files,
                   backend=a.backend, actors=a.actors, cpus_per_actor=a.cpus_per_actor,
                   threads_per_actor=a.threads_per_actor,
                   gpus_per_actor=a.gpus_per_actor, memory_per_actor=a.memory_per_actor,
                   cpus_per_task=a.cpus_per_task, batch_size=a.batch_size, progress=not a.quiet)
    how = init_ray(a.address, a.num_cpus, verbose=a.verbose)
    if a.verbose:
        print(f"langid label: {how}", file=sys.stderr)
    print(label(job, meta).summary())
    return 0


def _names(text: str) -> list[str] | None:
    """argparse type: comma-separated names such as en,de."""
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def cmd_predict(a: argparse.Namespace) -> int:
    import json

    from langid.inference import load_model

    ident = load_model(a.model, a.device, window_seconds=a.whisper_window, backend=a.backend)
    preds = ident.predict_many(a.files, languages=a.languages, min_confidence=a.min_confidence,
                               top_k=a.top_k, switch_penalty=a.switch_penalty)
    if a.json:
        print(json.dumps([p.to_dict() for p in preds], indent=2))
        return 0
    width = max(len(p.path) for p in preds)
    for p in preds:
        if p.status != "ok":
            print(f"{p.path:<{width}}  error: {p.error}")
        else:
            top = "  ".join(f"{lang} {prob:.2f}" for lang, prob in p.top)
            note = f"  ({p.error})" if p.error else ""
            print(f"{p.path:<{width}}  {p.language:<8} {p.confidence:.3f}   [{top}]{note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="langid", description="Spoken-language identification jobs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("preprocess", help="audio files -> Parquet/PNG spectrogram store",
                       description="Decode audio, compute log-mel windows in parallel Ray tasks and write a "
                                   "sharded Parquet store. Resumable: files already in the store are skipped.")
    p.add_argument("--input", required=True, help="Kaggle tree, folder-per-language tree, or CSV/TSV manifest")
    p.add_argument("--output", required=True, help="store folder or URI (s3://..., gs://...)")
    p.add_argument("--format", default="auto", choices=["auto", "kaggle", "folders", "manifest"],
                   help="input layout (default: detect)")
    p.add_argument("--valid-fraction", type=float, default=0.2,
                   help="share of recordings (speakers) per language held out for validation (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the grouped split (default %(default)s)")
    p.add_argument("--split", choices=["train", "valid", "test"],
                   help="put every file in this split (e.g. test for a held-out set) instead of splitting")
    p.add_argument("--min-confidence", type=_probability, default=0.0,
                   help="with a label CSV as input: keep only answers at least this confident")
    p.add_argument("--group-by", choices=["speaker", "folder", "file"], default="speaker",
                   help="what stays on one side of the split for manifest rows: the speaker column (else each "
                        "file), the file's folder, or each file (default %(default)s)")
    p.add_argument("--png", action="store_true", help="also write one PNG image per window under STORE/png")
    p.add_argument("--batch-size", type=int, default=32, help="files per task and per shard (default %(default)s)")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="Ray CPUs reserved per task (default %(default)s)")
    p.add_argument("--memory-per-task", type=memory_size, default=0,
                   help="memory reserved per task for Ray's scheduler, e.g. 2G (default: none reserved)")
    p.add_argument("--max-seconds", type=float, default=MAX_SECONDS,
                   help="refuse files longer than this many seconds (default %(default)s)")
    _add_feature_flags(p)
    _add_ray_flags(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("train", help="staged ResNet fine-tune with fastai on Ray Train",
                       description="The write-up's three-stage fine-tune (head; all layers with discriminative "
                                   "learning rates; head again) as a Ray Train job. Rerunning with the same "
                                   "--output resumes from the last checkpoint.")
    p.add_argument("--store", required=True, help="store written by preprocess (train and valid splits)")
    p.add_argument("--output", required=True, help="model folder to write")
    p.add_argument("--arch", default="resnet152", choices=ARCHITECTURES, help="torchvision ResNet (default %(default)s)")
    p.add_argument("--epochs", type=_epochs, default=[7, 12, 8], help="epochs per stage (default 7,12,8)")
    p.add_argument("--lr", type=_per_stage(), default=[1e-2, 1e-3, 1e-4],
                   help="learning rate per stage (default 1e-2,1e-3,1e-4)")
    p.add_argument("--lr-divisors", type=_per_stage(positive=True), default=[9, 6, 1],
                   help="stage 2: lr divided by these for early body, late body, head (default 9,6,1)")
    p.add_argument("--batch-size", type=int, default=32, help="per worker (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (default %(default)s)")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per worker (default %(default)s)")
    p.add_argument("--memory-per-worker", type=memory_size, default=0,
                   help="memory reserved per worker, e.g. 8G (default: none reserved)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="one GPU per worker (default: when the Ray cluster has GPUs)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision on CUDA workers (default: on with --gpu, off on CPU)")
    p.add_argument("--shuffle-buffer", type=int_at_least(1), default=1024,
                   help="windows each worker shuffles among as the store streams in (default %(default)s)")
    p.add_argument("--no-pretrained", action="store_true", help="random initialisation, no ImageNet weights")
    p.add_argument("--weights", help="ImageNet weights file for the architecture (.pth or .safetensors)")
    p.add_argument("--no-spec-augment", action="store_true", help="no time shift / masking on training batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-failures", type=int, default=2, help="worker failures Ray Train recovers from")
    p.add_argument("--lr-find", action="store_true", help="run fastai's learning-rate finder instead of training")
    _add_ray_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics and a report for a model on a labelled store split",
                       description="Accuracy with a 95%% CI, per-language P/R/F1, confusion matrix (CSV, PNG), "
                                   "per-speaker accuracy, Cavg and EER; file scores average their windows.")
    _add_model_flags(p)
    p.add_argument("--store", required=True, help="store written by preprocess")
    p.add_argument("--output", required=True, help="folder for report.md, metrics.json and the figures")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="(default %(default)s)")
    p.add_argument("--languages", type=_names,
                   help="score answers among these only, e.g. en,de,es (as label --languages)")
    p.add_argument("--batch-size", type=int, help="windows per forward pass (default: the backend's)")
    _add_backend_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("label", help="bulk-label a directory, glob, file list or archive to a CSV",
                       description="One CSV row per input file (ok or error), streamed through Ray Data: decoding "
                                   "in tasks, the model once per actor. Rerunning with the same --output resumes. "
                                   "Exit status 0 when the job ran, even with error rows.")
    _add_model_flags(p)
    p.add_argument("--input", required=True,
                   help="directory (recursive), glob ('data/**/*.flac'), file list (@list.txt), or .tar/.tar.gz/.zip")
    p.add_argument("--output", required=True, help="CSV to write (rows accumulate in OUTPUT.partial until done)")
    _add_answer_flags(p)
    p.add_argument("--overlap", type=float, default=0.0, help="window overlap for long files, 0-0.9 (default 0)")
    p.add_argument("--probabilities", action="store_true", help="add one p_<language> column per language")
    p.add_argument("--segments", help="also write a per-segment timeline CSV here (start, end, language)")
    p.add_argument("--parquet", help="also write the result as Parquet with the full probability vector")
    p.add_argument("--all-files", action="store_true", help="label every file, not only audio extensions")
    p.add_argument("--max-seconds", type=float, default=MAX_SECONDS, help="refuse longer files (default %(default)s)")
    p.add_argument("--actors", type=_positive_int, default=1, help="model actors (default %(default)s)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="(default %(default)s)")
    p.add_argument("--threads-per-actor", type=int_at_least(0), default=0,
                   help="the model's threads in each actor (default: twice --cpus-per-actor; the extra ones use "
                        "the CPU decoding leaves idle)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="e.g. 1 on GPU nodes (default %(default)s)")
    p.add_argument("--memory-per-actor", type=memory_size, default=0,
                   help="memory reserved per model actor, e.g. 2G (default: none reserved)")
    p.add_argument("--cpus-per-task", type=float, default=1.0,
                   help="CPUs per decoding task (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="files per inference batch (default %(default)s)")
    _add_backend_flag(p)
    _add_ray_flags(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("predict", help="languages of a few files, without Ray",
                       description="Predict the language of each file in this process (no Ray): a table, or --json.")
    p.add_argument("files", nargs="+", help="audio files")
    _add_model_flags(p)
    _add_answer_flags(p)
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    _add_backend_flag(p)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UserError, *PATH_ERRORS) as e:
        if os.environ.get("LANGID_DEBUG"):  # the traceback behind a one-line error, for bug reports
            raise
        print(f"langid {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"langid {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
