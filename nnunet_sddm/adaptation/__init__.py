"""Adaptation with the guided sampler: arrays of volumes (``volumes``), image files and folders
(``folders``), synthetic datasets (``synthesize``), parameter sweeps (``sweep``), ``torchrun``
helpers (``distributed``) and adaptation inside nnU-Net prediction (``predictor``)."""
