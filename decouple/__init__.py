"""decouple: cached-feature, two-stage decoupled training for long-tailed recognition.

Stage one fine-tunes a timm backbone and caches embeddings to HDF5; stage two
retrains only the classifier on those embeddings under each long-tailed loss,
re-sampler and head (Kang et al., "Decoupling Representation and Classifier
for Long-Tailed Recognition", ICLR 2020).
"""

import importlib

__version__ = "0.1.0"

#: Loaded on first use, so that ``import decouple`` stays light (no torch).
_LAZY = {"load_model": "decouple.deploy.model", "predict": "decouple.deploy.predict"}


def __getattr__(name: str):
    """``decouple.load_model`` and ``decouple.predict`` (the deployed classifier's API)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'decouple' has no attribute {name!r}")
