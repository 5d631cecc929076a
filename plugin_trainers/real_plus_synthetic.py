"""Train on a real dataset plus SD-DM synthetic cases (beyond the paper, Diffuse-UDA-style).

``nnUNetTrainer_SDDM_RealPlusSynthetic`` is ``nnUNetTrainer_SDDM_NoDA_250ep`` (no augmentation,
no mirroring, 250 epochs) whose TRAINING set is the fold's real training cases plus the synthetic
cases prepared by :func:`plugin_trainers.synthetic_data.prepare_synthetic` (link file
``sddm_synthetic.json`` next to the real plans). Validation (per-epoch pseudo Dice and the final
validation) uses the fold's real validation cases only; synthetic copies of validation patients
are excluded from training (:func:`~plugin_trainers.synthetic_data.select_synthetic`). A training
sample is drawn from a synthetic case with the link's ``fraction`` (exactly achievable value in
``f_eff``). Everything is recorded in ``<fold folder>/sddm_real_plus_synthetic.json``.
"""
from __future__ import annotations

from plugin_trainers.compat import require_supported_nnunet

require_supported_nnunet()

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import nnunetv2  # noqa: E402
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class  # noqa: E402

import nnunet_sddm  # noqa: E402
from nnunet_sddm.utilities.errors import SDDMError  # noqa: E402
from nnunet_sddm.utilities.files import write_json  # noqa: E402
from plugin_trainers.nodata_aug import nnUNetTrainer_SDDM_NoDA_250ep  # noqa: E402
from plugin_trainers.schedule import QuickSchedule, module_getattr, register_family  # noqa: E402
from plugin_trainers.synthetic_data import (  # noqa: E402
    RealPlusSyntheticCases,
    load_link,
    sampling_repeats,
    select_synthetic,
)

RECORD_FILE = "sddm_real_plus_synthetic.json"


class nnUNetTrainer_SDDM_RealPlusSynthetic(nnUNetTrainer_SDDM_NoDA_250ep):
    """Real + synthetic training cases, real-only validation, synthetic fraction from the link file."""

    def get_tr_and_val_datasets(self):
        if self.is_cascaded:
            raise SDDMError(f"{self.__class__.__name__} does not support cascaded configurations")
        tr_keys, val_keys = self.do_split()
        base = Path(self.preprocessed_dataset_folder_base)
        link = load_link(base)
        if link["plans_identifier"] != self.plans_manager.plans_name:
            raise SDDMError(f"{base / 'sddm_synthetic.json'}: synthetic cases were preprocessed with plans "
                            f"{link['plans_identifier']!r}, this training uses {self.plans_manager.plans_name!r}")
        data_identifier = self.configuration_manager.data_identifier
        if link["data_identifiers"].get(self.configuration_name) != data_identifier:
            raise SDDMError(f"{base / 'sddm_synthetic.json'}: no synthetic cases preprocessed for configuration "
                            f"{self.configuration_name!r}; run python -m plugin_trainers.synthetic_data -d "
                            f"{base.name} -s {link['synthetic_dataset']} -c {self.configuration_name}")
        syn_root = base / link["folder"]
        syn_folder = syn_root / data_identifier
        records_file = syn_root / "cases.json"
        try:
            records = json.loads(records_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SDDMError(f"{records_file}: cannot read the synthetic case records ({e})") from None

        if self.fold == "all":  # nnU-Net validates on the training cases: nothing can leak
            used, excluded = sorted(r["case"] for r in records), []
        else:
            used, excluded = select_synthetic(records, val_keys, link.get("real_subjects", {}))
        a, b, f_eff = sampling_repeats(len(tr_keys), len(used), link["fraction"])

        kw = dict(folder_with_segs_from_previous_stage=None)
        real_tr = self.dataset_class(self.preprocessed_dataset_folder, list(tr_keys), **kw)
        dataset_val = self.dataset_class(self.preprocessed_dataset_folder, list(val_keys), **kw)
        synthetic = infer_dataset_class(str(syn_folder))(str(syn_folder), list(used), **kw)
        identifiers = sorted(tr_keys) * a + sorted(used) * b
        dataset_tr = RealPlusSyntheticCases(real_tr, synthetic, identifiers)

        record = {
            "trainer": self.__class__.__name__,
            "fold": self.fold,
            "synthetic_dataset": link["synthetic_dataset"],
            "synthetic_folder": str(syn_folder),
            "fraction_requested": float(link["fraction"]),
            "fraction_effective": f_eff,
            "real_repeats": a,
            "synthetic_repeats": b,
            "n_real_train": len(tr_keys),
            "n_real_val": len(val_keys),
            "n_synthetic_used": len(used),
            "n_synthetic_excluded": len(excluded),
            "synthetic_used": used,
            "synthetic_excluded": excluded,
            "rule": "synthetic cases never validate; copies whose source case or subject is in the "
                    "validation split are excluded from training",
            "nnunet_sddm_version": nnunet_sddm.__version__,
            "nnunetv2_version": getattr(nnunetv2, "__version__", None) or _nnunet_version(),
        }
        self._check_resume(record)
        write_json(record, Path(self.output_folder) / RECORD_FILE)
        self.print_to_log_file(f"RealPlusSynthetic: {len(tr_keys)} real x{a} + {len(used)} synthetic x{b} "
                               f"({len(excluded)} excluded), synthetic fraction {f_eff:.4f} "
                               f"(requested {link['fraction']})")
        return dataset_tr, dataset_val

    def _check_resume(self, record: dict) -> None:
        """Refuse to continue a training (``--c``) with another synthetic set or fraction."""
        p = Path(self.output_folder) / RECORD_FILE
        if self.current_epoch == 0 or not p.is_file():
            return
        old = json.loads(p.read_text())
        for key in ("synthetic_dataset", "fraction_requested", "n_synthetic_used"):
            if old.get(key) != record[key]:
                raise SDDMError(f"{p}: this training was started with {key}={old.get(key)!r}, the link file now "
                                f"gives {record[key]!r}; restore it or train without --c")


def _nnunet_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("nnunetv2")


register_family("nnUNetTrainer_SDDM_RealPlusSynthetic", nnUNetTrainer_SDDM_RealPlusSynthetic)


class nnUNetTrainer_SDDM_RealPlusSynthetic_Quick(QuickSchedule, nnUNetTrainer_SDDM_RealPlusSynthetic):
    """Tests and demos: 2 epochs x 5 iterations (2 validation iterations), final validation skipped."""


__getattr__ = module_getattr(__name__)
