"""langid: spoken-language identification jobs on Ray (preprocess, train, evaluate, label)."""

__version__ = "0.1.0"


def load_model(path: str, device: str | None = None, **kwargs):
    """Load a trained model folder for prediction: `langid.load_model("model/").predict("clip.flac")`; the
    other arguments are langid.inference.load_model's (backend, threads, window_seconds)."""
    from langid.inference import load_model as _load

    return _load(path, device, **kwargs)
