"""nnunet-sddm: SD-DM (source-domain diffusion model) adaptation for nnU-Net v2.

The package follows the flow of data:

``data``        nnU-Net raw datasets, volumes and 2D slices (normalisation, pad/resize)
``diffusion``   the improved-DDPM process, the ADM UNet, training and model folders
``sampling``    reference-guided sampling (Algorithm 1 of the paper)
``adaptation``  adaptation of volumes, folders and datasets, and inside nnU-Net prediction
``evaluation``  MedPy-identical metrics, statistics, tables, figures, domain shift
``cli``         thin command-line entry points over the functions above
"""

__version__ = "0.1.0"
