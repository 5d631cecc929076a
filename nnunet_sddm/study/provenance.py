"""``study.json``: the complete configuration of a study, its device, software versions and hardware."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict

import torch

import nnunet_sddm
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.utilities.files import write_json

RECORD_FILE = "study.json"

#: Packages whose versions a study records.
PACKAGES = ("nnunet-sddm", "nnunetv2", "torch", "numpy", "scipy", "SimpleITK", "nibabel", "MedPy",
            "scikit-learn", "dynamic-network-architectures", "batchgenerators")


def software_versions() -> Dict[str, str]:
    """Versions of Python, the platform and the packages a study depends on (and the git
    revision of this checkout, if it is one)."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        repo = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            out["nnunet-sddm git"] = rev.stdout.strip() + (" (modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def hardware() -> Dict[str, Any]:
    """CPU count, processor and the CUDA devices' names."""
    info: Dict[str, Any] = {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def write_record(ctx: StudyContext, log: Callable[[str], None] = print) -> Path:
    """Write ``OUT/study.json`` (a note if the old one was written for another output folder)."""
    path = ctx.out / RECORD_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text()).get("config", {})
        except json.JSONDecodeError:
            old = {}
        if old and old.get("output") and Path(old["output"]).resolve() != ctx.out:
            log(f"[study] note: {path} was written for output {old['output']}")
    write_json({"package_version": nnunet_sddm.__version__, "config": ctx.cfg.to_dict(), "device": ctx.device,
                "software": software_versions(), "hardware": hardware()}, path)
    return path
