"""Trainer plumbing without training: compatibility guard, discovery, epoch variants, synthetic rules."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_sddm.utilities.errors import SDDMError
from plugin_trainers import compat, discovery

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- guard
@pytest.mark.parametrize("version", ["2.8.0", "2.8.1", "2.8.12.dev3"])
def test_guard_accepts_supported_versions(version):
    compat.check_version(version)


@pytest.mark.parametrize("version", ["2.7.3", "2.9.0", "2.9.0rc1", "3.0", "1.7.1"])
def test_guard_rejects_other_versions(version):
    with pytest.raises(compat.NNUNetCompatibilityError, match=rf"nnunetv2 {version} is installed.*>=2.8,<2.9"):
        compat.check_version(version)


def test_guard_rejects_changed_trainer_signatures():
    class NewInit:
        def __init__(self, plans, configuration, fold, dataset_json, device=None, seed=0):
            pass

        @staticmethod
        def build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                       num_output_channels, enable_deep_supervision=True):
            pass

    class OldBuild(NewInit):
        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            pass

        @staticmethod
        def build_network_architecture(architecture_class_name, arch_init_kwargs, arch_init_kwargs_req_import,
                                       num_input_channels, num_output_channels, enable_deep_supervision=True):
            pass

    with pytest.raises(compat.NNUNetCompatibilityError, match=r"__init__ has parameters .*'seed'"):
        compat.check_trainer_api(NewInit)
    with pytest.raises(compat.NNUNetCompatibilityError, match=r"build_network_architecture"):
        compat.check_trainer_api(OldBuild)
    compat.require_supported_nnunet()  # the installed nnunetv2 passes


def test_guard_fires_at_import_with_a_clear_message():
    """Importing a trainer module under an unsupported nnunetv2 fails with the guard's message."""
    code = ("import plugin_trainers.compat as c; c._installed_version = lambda: '2.9.1'; "
            "import plugin_trainers.nodata_aug")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode != 0
    assert "NNUNetCompatibilityError: nnunetv2 2.9.1 is installed" in r.stderr
    assert "pip install 'nnunetv2>=2.8,<2.9'" in r.stderr


# ---------------------------------------------------------------------------------------------- discovery
def test_trainer_folder_holds_only_thin_modules():
    folder = Path(discovery.trainer_path())
    assert folder.is_dir() and not (folder / "__init__.py").exists()
    for f in folder.glob("*.py"):
        code = [ln for ln in f.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
        body = "\n".join(code)
        assert "class " not in body and "def " not in body, f"{f} must only re-export"


def test_ensure_trainer_path_keeps_user_folders_and_is_idempotent(tmp_path):
    env = {"nnUNet_extTrainer": str(tmp_path)}
    discovery.ensure_trainer_path_in_env(env)
    discovery.ensure_trainer_path_in_env(env)
    assert env["nnUNet_extTrainer"].split(os.pathsep) == [str(tmp_path), discovery.trainer_path()]
    assert discovery.ensure_trainer_path_in_env({})["nnUNet_extTrainer"] == discovery.trainer_path()


def test_print_trainer_path_console_script():
    r = subprocess.run(["nnUNetv2_sddm_trainer_path"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == discovery.trainer_path()


@pytest.mark.timeout(300)
def test_nnunet_lookup_finds_our_single_copy_and_no_builtin_shadows(monkeypatch):
    """nnU-Net's own lookup resolves every name to the class of the installed package (not a second
    copy), built-ins do not define any of our names, and unknown names still fail."""
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from plugin_trainers import augmented, nodata_aug, real_plus_synthetic, vanilla_unet_trainer

    monkeypatch.setenv("nnUNet_extTrainer", discovery.trainer_path())
    builtins_folder = os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer")
    for name in discovery.TRAINER_NAMES + ("nnUNetTrainer_SDDM_NoDA_7ep", "nnUNetTrainer_SDDM_VanillaUNet_2ep_10it",
                                           "nnUNetTrainer_SDDM_Aug_1ep_150it", "nnUNetTrainer_SDDM_VanillaUNetAug_3ep"):
        assert recursive_find_python_class(builtins_folder, name, "nnunetv2.training.nnUNetTrainer",
                                           nnunetv2.__path__[0]) is None, f"built-in {name} would shadow ours"
        cls = recursive_find_trainer_class_by_name(name)
        home = {m.__name__: m for m in (augmented, nodata_aug, vanilla_unet_trainer,
                                        real_plus_synthetic)}[cls.__module__]
        assert getattr(home, name) is cls
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer"):
        recursive_find_trainer_class_by_name("nnUNetTrainer_SDDM_DoesNotExist")


# ---------------------------------------------------------------------------------------------- schedule
def test_epoch_variants_by_name():
    from plugin_trainers import nodata_aug, schedule, vanilla_unet_trainer

    assert nodata_aug.nnUNetTrainer_SDDM_NoDA_250ep.sddm_num_epochs == 250
    assert vanilla_unet_trainer.nnUNetTrainer_SDDM_VanillaUNet.sddm_num_epochs == 250
    for n in (1, 5, 20, 50):
        assert getattr(nodata_aug, f"nnUNetTrainer_SDDM_NoDA_{n}ep").sddm_num_epochs == n
        assert getattr(vanilla_unet_trainer, f"nnUNetTrainer_SDDM_VanillaUNet_{n}ep").sddm_num_epochs == n
    c = schedule.epoch_variant("nnUNetTrainer_SDDM_VanillaUNet_120ep")
    assert c is vanilla_unet_trainer.nnUNetTrainer_SDDM_VanillaUNet_120ep  # cached, module-visible
    assert c.__name__ == "nnUNetTrainer_SDDM_VanillaUNet_120ep" and c.sddm_num_epochs == 120
    assert issubclass(c, vanilla_unet_trainer.nnUNetTrainer_SDDM_VanillaUNet)
    assert schedule.epoch_variant("nnUNetTrainer_SDDM_NoDA_20ep") is nodata_aug.nnUNetTrainer_SDDM_NoDA_20ep
    import pickle

    assert pickle.loads(pickle.dumps(c)) is c
    # epochs x iterations in the name; validation iterations in nnU-Net's 250 : 50 ratio
    d = schedule.epoch_variant("nnUNetTrainer_SDDM_NoDA_3ep_101it")
    assert d is nodata_aug.nnUNetTrainer_SDDM_NoDA_3ep_101it and pickle.loads(pickle.dumps(d)) is d
    assert (d.sddm_num_epochs, d.sddm_iterations_per_epoch, d.sddm_val_iterations_per_epoch) == (3, 101, 21)
    assert issubclass(d, nodata_aug.nnUNetTrainer_SDDM_NoDA_250ep)
    assert schedule.epoch_variant("nnUNetTrainer_SDDM_NoDA_3ep") is not d
    for bad in ("nnUNetTrainer_SDDM_NoDA_0ep", "nnUNetTrainer_SDDM_Other_5ep", "nnUNetTrainer_5epochs",
                "nnUNetTrainer_SDDM_NoDA_5", "nnUNetTrainer_SDDM_NoDA_5ep_0it", "nnUNetTrainer_SDDM_NoDA_5ep_it",
                "nnUNetTrainer_SDDM_NoDA_5ep10it"):
        assert not hasattr(nodata_aug, bad)
    for quick in (nodata_aug.nnUNetTrainer_SDDM_NoDA_Quick, vanilla_unet_trainer.nnUNetTrainer_SDDM_VanillaUNet_Quick):
        assert quick.sddm_final_validation is False and quick.sddm_iterations_per_epoch < 250


def test_final_validation_can_be_skipped_by_the_environment(monkeypatch):
    """``nnUNet_sddm_final_validation=0`` (set by the study) skips nnU-Net's final validation of
    any SD-DM trainer; unset or 1 runs it; anything else is refused by name (when the trainer is
    built: ``final_validation_enabled`` in ``ScheduleMixin.__init__``)."""
    from plugin_trainers.schedule import ScheduleMixin, final_validation_enabled

    assert final_validation_enabled({}) is True and final_validation_enabled({"nnUNet_sddm_final_validation": "1"})
    assert final_validation_enabled({"nnUNet_sddm_final_validation": "0"}) is False
    with pytest.raises(SDDMError, match="nnUNet_sddm_final_validation='no'"):
        final_validation_enabled({"nnUNet_sddm_final_validation": "no"})

    class _Base:
        def perform_actual_validation(self, save_probabilities=False):
            self.validated = True

        def print_to_log_file(self, *args):
            self.logged = " ".join(map(str, args))

    class _Trainer(ScheduleMixin, _Base):
        pass

    for enabled in (True, False):
        t = object.__new__(_Trainer)
        t.sddm_environment_validation = enabled
        t.perform_actual_validation()
        assert getattr(t, "validated", False) is enabled
    assert "nnUNet_sddm_final_validation=0" in t.logged


# ---------------------------------------------------------------------------------------------- synthetic
def test_select_synthetic_keeps_validation_patients_out():
    from plugin_trainers.synthetic_data import select_synthetic

    records = [
        {"case": "p1_ED_syn0", "subject": "p1", "source_case": "p1_ED"},
        {"case": "p1_ES_syn0", "subject": "p1", "source_case": "p1_ES"},  # other phase of a val patient
        {"case": "p2_ED_syn0", "subject": "p2", "source_case": "p2_ED"},
        {"case": "p3_ED_syn0", "subject": "p3", "source_case": "p3_ED"},
        {"case": "x_syn0", "subject": "q9", "source_case": "x"},  # subject known only from the real dataset
    ]
    used, excluded = select_synthetic(records, ["p1_ED", "q9_ES"], {"q9_ES": "q9", "p3_ED": "p3"})
    assert excluded == ["p1_ED_syn0", "p1_ES_syn0", "x_syn0"]
    assert used == ["p2_ED_syn0", "p3_ED_syn0"]


@pytest.mark.parametrize("n_real,n_syn,f", [(8, 8, 0.5), (8, 24, 0.3), (37, 5, 0.8), (4, 40, 0.05), (3, 7, 0.999)])
def test_sampling_repeats_reach_the_fraction(n_real, n_syn, f):
    from plugin_trainers.synthetic_data import sampling_repeats

    a, b, f_eff = sampling_repeats(n_real, n_syn, f)
    assert a >= 1 and b >= 1
    assert f_eff == pytest.approx(b * n_syn / (a * n_real + b * n_syn))
    assert abs(f_eff - f) <= 1e-3


def test_sampling_repeats_edges_and_bad_values():
    from plugin_trainers.synthetic_data import sampling_repeats

    assert sampling_repeats(5, 10, 0.0) == (1, 0, 0.0)
    assert sampling_repeats(5, 0, 0.5) == (1, 0, 0.0)
    assert sampling_repeats(5, 10, 1.0) == (0, 1, 1.0)
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(SDDMError, match="fraction"):
            sampling_repeats(5, 10, bad)
