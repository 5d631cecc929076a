"""``nnUNetv2_sddm_phantoms``: multi-vendor synthetic cardiac cine MR phantoms as an nnU-Net raw dataset.

The phantoms themselves (anatomy, vendor presets, scanner model) live in ``nnunet_sddm.data.phantoms``.
"""
from __future__ import annotations

import argparse
import time

from nnunet_sddm.data.phantoms import VENDORS, generate_phantom_dataset
from nnunet_sddm.data.raw_dataset import log
from nnunet_sddm.utilities.errors import cli_entry


@cli_entry
def main(argv=None) -> int:
    """``nnUNetv2_sddm_phantoms``: generate a phantom dataset of one vendor."""
    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_phantoms",
        description="Generate multi-vendor synthetic cardiac cine MR phantoms (short-axis stacks, ED "
                    "and ES, labels 1 LV, 2 MYO, 3 RV) as an nnU-Net raw dataset in $nnUNet_raw.")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    p.add_argument("--vendor", required=True, choices=sorted(VENDORS) + sorted(v.lower() for v in VENDORS),
                   help="scanner preset: " + "; ".join(f"{k}: {v.like}" for k, v in VENDORS.items()))
    p.add_argument("--cases", type=int, default=20,
                   help="training subjects, each giving an ED and an ES case (default 20 = 40 cases)")
    p.add_argument("--test-cases", type=int, default=0,
                   help="extra subjects written to imagesTs/labelsTs (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical files)")
    p.add_argument("--name", default=None, help="dataset name (default Phantom<V>)")
    p.add_argument("--matrix", type=int, default=None,
                   help="in-plane matrix N x N over the vendor's field of view; the in-plane spacing "
                        "becomes FOV/N (e.g. 64 -> ~5 mm pixels, for fast CPU tests). Default: the "
                        "vendor's realistic 1.25-1.7 mm spacing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    a = p.parse_args(argv)
    t0 = time.time()
    out = generate_phantom_dataset(a.dataset_id, a.vendor, a.cases, a.test_cases, seed=a.seed,
                                   name=a.name, overwrite=a.overwrite, matrix=a.matrix)
    log(f"done in {time.time() - t0:.1f} s")
    print(out)
    return 0


if __name__ == "__main__":
    main()
