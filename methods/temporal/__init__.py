"""TFMQ-DM's temporal machinery: what the Temporal Information Block is and how it is maintained.

- tib.py: find the TIB (modules whose output depends only on the timestep and a finite label) and
  compute its temporal features without running the rest of the network.
- labels.py: publish the class labels of the denoiser call in progress (the cache keys on them).
- tiar.py: temporal information-aware reconstruction of the TIB alone.
- fsc.py: finite set calibration (one activation range per timestep) and the schedule guard.
- cache.py: precomputed, quantized temporal features served by timestep and label.
- selection.py: per feature, keep the TIB path or the cache path, whichever is closer to FP.

To add a model family: teach `find_tib` its TIB and `temporal_features` how to evaluate it.
"""
