"""langid: spoken-language identification jobs on Ray (preprocess, train, evaluate, label)."""

import warnings

__version__ = "0.1.0"

# fastai decorates a few of its functions with torch.jit.script when imported, which torch now calls deprecated:
# a line on every training run that the user can do nothing about
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)


def load_model(path: str, device: str | None = None, **kwargs):
    """Load a trained model folder for prediction: `langid.load_model("model/").predict("clip.flac")`; the
    other arguments are langid.inference.load_model's (backend, threads, window_seconds)."""
    from langid.inference import load_model as _load

    return _load(path, device, **kwargs)
