"""Metrics: image quality from features (fidelity), temporal / trajectory error, latency and size.

Feature extractors register by name in `features.EXTRACTORS` (lenet, inception). To add one:
write `harness/metrics/<name>.py` with a `FeatureExtractor` subclass whose `extract_batch` maps
images in [-1, 1] to `Features(pooled, spatial, logits)` and `describe()` names its weights, end it
with `EXTRACTORS.register("<name>")(YourExtractor)`, and import the module at the end of features.py.
This package imports nothing itself: the tables read saved statistics (uncertainty.py) without torch.
"""
