"""Stage one: images to a feature file.

Sources and long-tailed splits (saved as a manifest), image decoding, timm
backbones, fine-tuning (torch DDP under torchrun) and extraction of every
split's embeddings to HDF5 (:mod:`decouple.features`).
"""
