"""Data: nnU-Net raw datasets (``raw_dataset``), 3D volumes with their geometry (``volumes``) and
2D model-space slices (``slices``: percentile normalisation, pad to square, resize)."""
