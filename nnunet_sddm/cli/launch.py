"""Console-script launcher: the environment check first, then the command's own module.

A console script imports its module (and that module's imports: torch, nnunetv2, torchvision)
before its ``main`` runs, so a broken torch/torchvision pair would fail there with an obscure
import error. Every script of setup.cfg therefore points here (``nnunet_sddm.cli.launch:<script
name>``): the launcher runs :func:`nnunet_sddm.utilities.environment.startup_check` (metadata
only, exit 2 with the fix on a mismatch), then imports the target of :data:`SCRIPTS` and calls it
exactly as the console script would have. ``nnUNet_sddm_skip_env_check=1`` skips the check.

    python -m nnunet_sddm.cli.launch nnUNetv2_sddm_adapt --help   # same as nnUNetv2_sddm_adapt --help

This module imports nothing heavy.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, List, Optional, Sequence

#: Console-script name -> ``"module:function"`` it runs (setup.cfg points each name here).
SCRIPTS: Dict[str, str] = {
    "nnUNetv2_sddm_convert_acdc": "dataset_converters.acdc:main",
    "nnUNetv2_sddm_convert_mnms": "dataset_converters.mnms:main",
    "nnUNetv2_sddm_phantoms": "dataset_converters.phantoms:main",
    "nnUNetv2_sddm_trainer_path": "plugin_trainers.discovery:print_trainer_path",
    "nnUNetv2_sddm_train": "nnunet_sddm.cli.diffusion:train_main",
    "nnUNetv2_sddm_import_checkpoint": "nnunet_sddm.cli.diffusion:import_checkpoint_main",
    "nnUNetv2_sddm_generate_labels": "nnunet_sddm.cli.diffusion:generate_labels_main",
    "nnUNetv2_sddm_adapt": "nnunet_sddm.cli.adaptation:adapt_main",
    "nnUNetv2_sddm_synthesize": "nnunet_sddm.cli.adaptation:synthesize_main",
    "nnUNetv2_sddm_predict": "nnunet_sddm.cli.prediction:predict_main",
    "nnUNetv2_sddm_pseudo_label": "nnunet_sddm.cli.prediction:pseudo_label_main",
    "nnUNetv2_sddm_sweep": "nnunet_sddm.cli.adaptation:sweep_main",
    "nnUNetv2_sddm_evaluate": "nnunet_sddm.cli.evaluation:evaluate_main",
    "nnUNetv2_sddm_compare": "nnunet_sddm.cli.evaluation:compare_main",
    "nnUNetv2_sddm_domain_shift": "nnunet_sddm.cli.evaluation:domain_shift_main",
    "nnUNetv2_sddm_quality": "nnunet_sddm.cli.evaluation:quality_main",
    "nnUNetv2_sddm_mask_adherence": "nnunet_sddm.cli.evaluation:mask_adherence_main",
    "nnUNetv2_sddm_study": "nnunet_sddm.cli.study:study_main",
    "nnUNetv2_sddm_doctor": "nnunet_sddm.cli.doctor:doctor_main",
}

#: Scripts that run the check themselves as part of a longer report (the doctor: it reports the
#: mismatch with everything else and then exits 2).
SELF_CHECKING = frozenset({"nnUNetv2_sddm_doctor"})


def target(script: str) -> Callable[[], object]:
    """Import and return the function that console script ``script`` runs (``KeyError`` if unknown)."""
    module, _, func = SCRIPTS[script].partition(":")
    return getattr(importlib.import_module(module), func)


def run(script: str) -> object:
    """Check the environment (unless ``script`` does it itself), then call the script's function
    with no arguments (it parses ``sys.argv``) and return its result (the console-script exit code)."""
    if script not in SELF_CHECKING:
        from nnunet_sddm.utilities.environment import startup_check

        startup_check()
    return target(script)()


def _entry(script: str) -> Callable[[], object]:
    def entry() -> object:
        return run(script)

    entry.__name__ = entry.__qualname__ = script
    entry.__doc__ = f"``{script}``: the environment check, then ``{SCRIPTS[script]}``."
    return entry


# One module attribute per console script: ``nnunet_sddm.cli.launch:nnUNetv2_sddm_adapt`` ...
for _script in SCRIPTS:
    globals()[_script] = _entry(_script)
del _script


def main(argv: Optional[Sequence[str]] = None) -> object:
    """``python -m nnunet_sddm.cli.launch SCRIPT [ARGS...]``: run a console script by name."""
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in SCRIPTS:
        print("usage: python -m nnunet_sddm.cli.launch SCRIPT [ARGS...]\nscripts: " + " ".join(SCRIPTS),
              file=sys.stderr)
        return 2
    sys.argv = args
    return run(args[0])


if __name__ == "__main__":
    sys.exit(main())
