"""nnU-Net v2 trainers for the SD-DM ablation (installed package; see ``nnunet_ext`` for discovery)."""
