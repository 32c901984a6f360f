#!/usr/bin/env python
"""Preprocess audio into a langid spectrogram store (Parquet, optional PNG), on Ray.

Locally:    python jobs/preprocess.py --input data/ --output store/
On Ray:     ray submit cluster.yaml jobs/preprocess.py --input /shared/audio --output s3://b/store
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from langid.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
