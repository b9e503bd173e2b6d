"""decouple: cached-feature, two-stage decoupled training for long-tailed recognition.

Stage one fine-tunes a timm backbone and caches embeddings to HDF5; stage two
retrains only the classifier on those embeddings under each long-tailed loss,
re-sampler and head (Kang et al., "Decoupling Representation and Classifier
for Long-Tailed Recognition", ICLR 2020).
"""

__version__ = "0.1.0"
