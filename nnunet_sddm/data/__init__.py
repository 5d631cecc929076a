"""Data: nnU-Net raw datasets (``raw_dataset``), 3D volumes with their geometry (``volumes``),
2D model-space slices (``slices``: percentile normalisation, pad to square, resize), phantoms
(``phantoms``) and seeded, topology-preserving deformations of label maps and images
(``deformation``: new anatomies for mask-conditioned synthesis)."""
