"""Shared fixtures: temporary nnU-Net folders and the optional real data in ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from _micro_model import one_torch_thread

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SDDM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """Point nnUNet_raw / nnUNet_preprocessed / nnUNet_results at fresh temporary folders."""
    folders = {}
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                     ("nnUNet_results", "results")):
        p = tmp_path / "nnunet" / sub
        p.mkdir(parents=True)
        monkeypatch.setenv(var, str(p))
        folders[sub] = p
    return folders


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real ACDC and M&Ms samples); skips the test when absent."""
    if not (SHARED_DATA / "ACDC").is_dir() or not (SHARED_DATA / "MnMs1-sample").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One torch thread during the test (small models; see ``_micro_model.one_torch_thread``)."""
    with one_torch_thread():
        yield
