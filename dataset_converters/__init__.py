"""Writers of nnU-Net raw datasets: ACDC, M&Ms-1/2 and multi-vendor cardiac phantoms."""
