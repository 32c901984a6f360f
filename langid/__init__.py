"""langid: spoken-language identification jobs on Ray (preprocess, train, evaluate, label)."""

import warnings

__version__ = "0.1.0"

# fastai decorates a few of its functions with torch.jit.script when imported, which torch now calls deprecated:
# a line on every training run that the user can do nothing about
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)


def __getattr__(name: str):
    """`langid.load_model` is `langid.inference.load_model`, imported on first use (`import langid` stays light)."""
    if name == "load_model":
        from langid.inference import load_model

        return load_model
    raise AttributeError(f"module 'langid' has no attribute {name!r}")
