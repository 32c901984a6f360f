#!/usr/bin/env python
"""Synthesise a small multilingual demo corpus with espeak-ng, in the Kaggle spoken-language-identification layout.

    python jobs/make_demo_corpus.py --output data/demo
    python jobs/make_demo_corpus.py --output data/demo --languages en,de,es,fr --fragments 12
"""
import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from langid.cli import int_at_least  # noqa: E402
from langid.errors import UserError  # noqa: E402
from langid.synthesis import build_demo_corpus, build_long_files  # noqa: E402

DEFAULT_NOISE_DIR = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "noise"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


_count, _positive = int_at_least(0), int_at_least(1)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(
        prog="make_demo_corpus.py",
        description="Synthesise speech with espeak-ng into ROOT/train/train and ROOT/test/test as 10-s, 22,050-Hz mono "
                    "FLAC files named <lang>_<gender>_<recording id>.fragmentN[.speedK|.pitchK|.noiseK].flac, like the "
                    "Kaggle spoken-language-identification set. Each speaker (an espeak voice variant with its own "
                    "pitch and rate) reads one recording of pseudo-sentences cut into consecutive fragments; test "
                    "speakers never appear in training and only training files are augmented. Existing files are "
                    "kept, so a rerun is cheap, and the output is the same for a given seed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", required=True, metavar="DIR", help="corpus root (created if missing)")
    p.add_argument("--languages", default="en,de,es", help="comma-separated espeak-ng language codes")
    p.add_argument("--train-speakers", type=_count, default=6, help="training voices (each speaks every language)")
    p.add_argument("--test-speakers", type=_count, default=2, help="test voices, never heard in training")
    p.add_argument("--fragments", type=_positive, default=6, help="10-s original fragments per speaker")
    p.add_argument("--speed", type=_count, default=1, help="speed-changed versions (x0.8-1.2) per training fragment")
    p.add_argument("--pitch", type=_count, default=1, help="pitch-shifted versions (+-200 cents) per training fragment")
    p.add_argument("--noise", type=_count, default=1, help="noisy versions (SNR 5-20 dB) per training fragment")
    p.add_argument("--seed", type=int, default=0, help="seed for voices, text and augmentations")
    p.add_argument("--noise-dir", default=DEFAULT_NOISE_DIR if os.path.isdir(DEFAULT_NOISE_DIR) else "",
                   help="folder of noise recordings to mix in; empty or missing: generated white/pink/brown noise")
    p.add_argument("--long-files", type=_count, default=3,
                   help="long files that switch language halfway (test voices), in --long-dir")
    p.add_argument("--long-dir", help="where the long files go (default: a folder 'long' beside OUTPUT)")
    p.add_argument("--workers", type=_positive, default=2, help="parallel processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    languages = [code.strip() for code in args.languages.split(",") if code.strip()]
    try:
        result = build_demo_corpus(
            args.output, languages=languages, train_speakers=args.train_speakers, test_speakers=args.test_speakers,
            fragments=args.fragments, speed=args.speed, pitch=args.pitch, noise=args.noise, seed=args.seed,
            noise_dir=args.noise_dir or None, workers=args.workers, progress=not args.quiet)
        long_dir = args.long_dir or os.path.join(os.path.dirname(os.path.abspath(args.output)), "long")
        long_files = build_long_files(args.output, long_dir, args.long_files)
    except UserError as e:  # a bad flag or language; anything else is a bug, with its traceback
        print(f"make_demo_corpus.py: error: {e}", file=sys.stderr)
        return 2
    per_language = ", ".join(
        f"{lang} {result['files']['train'][lang]}+{result['files']['test'][lang]}" for lang in languages)
    print(f"Demo corpus at {result['path']}: {result['total']} files ({sum(result['files']['train'].values())} train, "
          f"{sum(result['files']['test'].values())} test; train+test per language: {per_language}) from "
          f"{result['speakers']['train']} training and {result['speakers']['test']} test speakers, noise "
          f"{result['noise']}; {result['written']} written, {result['total'] - result['written']} already there, "
          f"in {result['seconds']:.1f} s. {len(long_files)} long two-language files in {long_dir}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
