"""langid: spoken-language identification jobs on Ray (preprocess, train, evaluate, label)."""

__version__ = "0.1.0"
