#!/usr/bin/env python
"""Bulk-label an audio archive (directory, glob, file list, tar/zip) to a CSV with a langid model, on Ray.

Locally:    python jobs/label.py --model model/ --input archive.tar.gz --output labels.csv
On Ray:     ray submit cluster.yaml jobs/label.py --model /shared/model --input /shared/audio --output labels.csv
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from langid.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
