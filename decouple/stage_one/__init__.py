"""Stage one: images to a feature file.

One module a step: ``sources`` (the data-source registry), ``splits`` (the
long-tailed subsample and val / test splits), ``manifest`` (the splits as
CSV), ``images`` (decoding and the Dataset), ``backbones`` (timm models and
weights), ``finetune`` (the training loop), ``distributed`` (torchrun ranks)
and ``extract`` (every split's embeddings to HDF5, :mod:`decouple.features`).
"""
