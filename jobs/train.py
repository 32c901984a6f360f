#!/usr/bin/env python
"""Train the staged ResNet fine-tune on a langid store with fastai on Ray Train.

Locally:    python jobs/train.py --store store/ --output model/ --arch resnet18 --workers 2
On Ray:     ray submit cluster.yaml jobs/train.py --store s3://b/store --output /shared/model --workers 4 --gpu
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from langid.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
