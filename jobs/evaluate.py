#!/usr/bin/env python
"""Evaluate a langid model on a store's test split: metrics.json, confusion matrix, report.md.

    python jobs/evaluate.py --model model/ --store store/ --output report/
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from langid.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
