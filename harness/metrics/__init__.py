"""Metrics: image quality from features (fidelity), temporal / trajectory error, latency and size.

Feature extractors register by name in `features.EXTRACTORS` (lenet, inception). To add one:
write `harness/metrics/<name>.py` with a `FeatureExtractor` subclass whose `extract_batch` maps
images in [-1, 1] to `Features(pooled, spatial, logits)` and `describe()` names its weights, end it
with `EXTRACTORS.register("<name>")(YourExtractor)`, and import the module below.
"""

from harness.metrics import inception, lenet
from harness.metrics.features import EXTRACTORS, FeatureExtractor, Features, build_extractor, images_to_features

__all__ = ["EXTRACTORS", "FeatureExtractor", "Features", "build_extractor", "images_to_features", "inception",
           "lenet"]
