"""Deployment: a fitted cell and its backbone as one classifier.

``model_file`` (the decouple-model format, read with
``torch.load(weights_only=True)``), ``build`` (from a fitted cell and its
feature file to a model file), ``model`` (:class:`DecoupleModel` and
:func:`load_model`), ``save`` (writing it, or a portable export),
``portable`` (TorchScript, ONNX) and ``predict`` (classifying image files).
"""
