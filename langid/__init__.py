"""langid: spoken-language identification jobs on Ray (preprocess, train, evaluate, label)."""

__version__ = "0.1.0"


def load_model(path: str, device: str | None = None):
    """Load a trained model folder for prediction: `langid.load_model("model/").predict("clip.flac")`."""
    from langid.inference import load_model as _load

    return _load(path, device)
