"""``nnUNetv2_sddm_doctor``: check the installation and say how to fix what is wrong.

Reports versions, devices, the nnU-Net folders, the trainer lookup and a real ``import
torchvision`` in a fresh process (the ``operator torchvision::nms does not exist`` failure of a
mismatched torch/torchvision pair shows there), then a summary with one fix per problem.
Exit code 0 when all is well, 2 when the torch/torchvision/nnunetv2 versions do not fit together
(the start-up check of every command), 1 for any other problem.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_sddm.utilities.environment import (
    EXIT_CODE, NNUNETV2_RANGE, SKIP_ENV_VAR, TESTED, InstalledMetadata, Problem, check_environment,
    format_problem, location_note, satisfies, tested_pair_fix)
from nnunet_sddm.utilities.errors import SDDMError, cli_entry

#: Distributions whose versions the doctor lists (besides Python and nnunet-sddm).
PACKAGES: Tuple[str, ...] = ("torch", "torchvision", "nnunetv2", "dynamic-network-architectures", "timm",
                             "numpy", "scipy", "SimpleITK", "nibabel", "MedPy", "batchgenerators",
                             "acvl-utils", "safetensors", "scikit-learn", "matplotlib")

#: nnU-Net's folder variables.
FOLDER_VARS: Tuple[str, ...] = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")

_PROBE_TAG = "SDDM_DOCTOR_PROBE "

# Runs in a fresh interpreter: a broken torch/torchvision cannot take the doctor down with it.
_PROBE = r"""
import json, sys
out = {}
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = bool(torch.cuda.is_available())
    n = torch.cuda.device_count() if out["cuda_available"] else 0
    out["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(n)]
    mps = getattr(torch.backends, "mps", None)
    out["mps_built"] = bool(mps is not None and mps.is_built())
    out["mps_available"] = bool(mps is not None and mps.is_available())
    out["threads"] = torch.get_num_threads()
except BaseException as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"
if "torch_error" not in out:
    try:
        import torchvision
        out["torchvision"] = torchvision.__version__
        torch.ops.torchvision.nms
        out["nms"] = True
    except BaseException as e:
        out["torchvision_error"] = f"{type(e).__name__}: {e}"
print("%s" + json.dumps(out))
""" % _PROBE_TAG


@dataclass
class Findings:
    """What the doctor found: version problems (exit 2), other problems (exit 1), notes (no effect)."""

    version_problems: List[Problem] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """2 for a version mismatch, 1 for another problem, 0 when all is well."""
        return EXIT_CODE if self.version_problems else (1 if self.problems else 0)


def _row(label: str, value: str) -> str:
    return f"  {label:<29} {value}"


def _first_line(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def probe_torch(timeout_s: float = 300.0) -> Dict[str, object]:
    """Import torch and torchvision in a fresh Python (``sys.executable``, this environment) and
    return what it saw: versions, CUDA/MPS state, thread count, or ``torch_error`` /
    ``torchvision_error`` (the exception's first line); ``probe_error`` if the process died."""
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"probe_error": f"importing torch took more than {timeout_s:.0f} s"}
    for line in reversed(r.stdout.splitlines()):
        if line.startswith(_PROBE_TAG):
            return json.loads(line[len(_PROBE_TAG):])
    tail = _first_line(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "") or "no output"
    return {"probe_error": f"the import process exited with code {r.returncode}: {tail}"}


def versions_section(meta: InstalledMetadata, out: List[str]) -> None:
    """Python, platform, nnunet-sddm and :data:`PACKAGES` (with where torch/torchvision come from
    when they come from different folders)."""
    from nnunet_sddm import __version__

    out.append("versions")
    out.append(_row("python", f"{platform.python_version()} ({sys.executable})"))
    out.append(_row("platform", platform.platform()))
    out.append(_row("nnunet-sddm", __version__))
    places = {n: meta.location(n) for n in ("torch", "torchvision")}
    split = len({p for p in places.values() if p}) > 1
    for name in PACKAGES:
        v = meta.version(name)
        text = v or "not installed"
        if v and name in TESTED and v.split("+")[0] != TESTED[name]:
            text += f"  (tested: {TESTED[name]})"
        if name == "nnunetv2":
            text += f"  (supported: {NNUNETV2_RANGE})"
        if split and places.get(name):
            text += f"  in {places[name]}"
        out.append(_row(name, text))


def devices_section(probe: Dict[str, object], out: List[str]) -> None:
    """CUDA, MPS and CPU as seen by torch in the probe process."""
    out.append("devices")
    if "torch" not in probe:
        out.append(_row("torch", "does not import (see the summary)"))
        out.append(_row("CPU", f"{os.cpu_count()} cores"))
        return
    if probe.get("cuda_available"):
        names = probe.get("cuda_devices") or []
        out.append(_row("CUDA", f"{len(names)} device(s): " + ", ".join(str(n) for n in names)))
    else:
        built = probe.get("torch_cuda")
        out.append(_row("CUDA", "not available" + (f" (torch built for CUDA {built})" if built else
                                                   " (CPU-only torch build)")))
    out.append(_row("MPS", "available" if probe.get("mps_available") else "not available"))
    out.append(_row("CPU", f"{os.cpu_count()} cores, torch uses {probe.get('threads')} threads"))


def imports_section(probe: Dict[str, object], findings: Findings, out: List[str]) -> bool:
    """The fresh-process import of torch and torchvision; True when both work."""
    out.append("imports (fresh process)")
    fix = (tested_pair_fix(),)
    if "probe_error" in probe:
        out.append(_row("torch", f"FAILED: {probe['probe_error']}"))
        findings.problems.append(Problem(f"importing torch fails: {probe['probe_error']}", fix))
        return False
    if "torch_error" in probe:
        out.append(_row("torch", f"FAILED: {_first_line(str(probe['torch_error']))}"))
        findings.problems.append(Problem(f"import torch fails: {_first_line(str(probe['torch_error']))}", fix))
        return False
    out.append(_row("torch", "ok"))
    if "torchvision_error" in probe:
        err = _first_line(str(probe["torchvision_error"]))
        out.append(_row("torchvision", f"FAILED: {err}"))
        if findings.version_problems:  # the mismatch explains it and has the fix
            findings.problems.append(Problem(f"import torchvision fails ({err}), as the version problem "
                                             f"above predicts"))
        else:
            findings.problems.append(Problem(
                f"import torchvision fails ({err}); nnunetv2 imports it through dynamic-network-architectures "
                f"-> timm, so every nnU-Net command fails", fix))
        return False
    out.append(_row("torchvision", "ok (torchvision::nms is registered)"))
    return True


def folders_section(findings: Findings, out: List[str], environ=None) -> None:
    """``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``: existing and writable where set
    (a problem otherwise); unset ones are a note (the study and the tests use their own folders)."""
    environ = os.environ if environ is None else environ
    out.append("nnU-Net folders")
    for var in FOLDER_VARS:
        value = environ.get(var, "")
        if not value:  # not needed by the study (its own folders) or the test suite: a note, not a problem
            out.append(_row(var, "not set"))
            findings.notes.append(f"{var} is not set: nnU-Net's commands and the dataset commands need it "
                                  f"(export {var}=/path/to/{var}); nnUNetv2_sddm_study --quick does not")
        elif not os.path.isdir(value):
            state = "is not a folder" if os.path.exists(value) else "does not exist"
            out.append(_row(var, f"{value}  ({state.upper()})"))
            findings.problems.append(Problem.simple(f"{var}={value} {state}",
                                                    *([f"mkdir -p {value}"] if state == "does not exist" else [])))
        elif not os.access(value, os.W_OK | os.X_OK):
            out.append(_row(var, f"{value}  (NOT WRITABLE)"))
            findings.problems.append(Problem.simple(f"{var}={value} is not writable for this user",
                                                    f"chmod u+w {value}   # or point {var} at a folder of yours"))
        else:
            out.append(_row(var, f"{value}  (ok, writable)"))


def trainers_section(findings: Findings, out: List[str], lookup: bool, environ=None) -> None:
    """``nnUNet_extTrainer``, the plugin's trainer folder and (if ``lookup``) nnU-Net's lookup of
    every SD-DM trainer name (imports nnunetv2, a few seconds)."""
    from nnunet_sddm.utilities.nnunet_paths import TRAINER_ENV_VAR, trainer_folder

    environ = os.environ if environ is None else environ
    out.append("trainers")
    try:
        folder = str(trainer_folder())
    except SDDMError as e:
        out.append(_row("trainer folder", "MISSING"))
        findings.problems.append(Problem.simple(str(e), "python -m pip install -e .   # in your nnunet-sddm clone"))
        return
    out.append(_row("trainer folder", folder))
    export = "export nnUNet_extTrainer=$(nnUNetv2_sddm_trainer_path)"
    parts = [p for p in environ.get(TRAINER_ENV_VAR, "").split(os.pathsep) if p.strip()]
    if not parts:
        out.append(_row(TRAINER_ENV_VAR, "not set (nnunet-sddm commands add the trainer folder themselves)"))
        findings.notes.append(f"for the stock nnUNetv2_train/nnUNetv2_predict with SD-DM trainers: {export}")
    else:
        ours = any(os.path.realpath(p) == os.path.realpath(folder) for p in parts)
        out.append(_row(TRAINER_ENV_VAR, os.pathsep.join(parts) + ("  (includes the trainer folder)" if ours
                                                                    else "  (WITHOUT the trainer folder)")))
        for p in parts:
            if not os.path.isdir(p):
                findings.problems.append(Problem.simple(f"{TRAINER_ENV_VAR} lists {p}, which is not a folder",
                                                        export))
        if not ours:
            findings.notes.append(f"the stock nnUNetv2_train/nnUNetv2_predict will not find the SD-DM trainers: "
                                  f"{export}")
    if not lookup:
        out.append(_row("trainer lookup", "skipped (fix the problems above first)"))
        return
    # the lookup runs in the plugin's own command, in a fresh process: the library never imports the trainers
    cmd = [sys.executable, "-m", "nnunet_sddm.cli.launch", "nnUNetv2_sddm_trainer_path", "--check"]
    env = dict(environ)
    env.pop(TRAINER_ENV_VAR, None)  # the command adds the plugin's folder itself
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        resolved = [line for line in r.stderr.splitlines() if " -> " in line]
        error = None if r.returncode == 0 else (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        resolved, error = [], f"{type(e).__name__}: {e}"
    if error is None:
        out.append(_row("trainer lookup", f"ok ({len(resolved)} SD-DM trainers resolve through nnU-Net)"))
    else:
        out.append(_row("trainer lookup", f"FAILED: {_first_line(error)}"))
        findings.problems.append(Problem.simple(f"nnU-Net's trainer lookup fails: {_first_line(error)}",
                                                "nnUNetv2_sddm_trainer_path --check   # shows the full error"))


def summary_section(findings: Findings, out: List[str]) -> None:
    """Each problem with its fix commands, then the notes."""
    problems = findings.version_problems + findings.problems
    out.append("summary" + (f": {len(problems)} problem(s), exit code {findings.exit_code}" if problems else ""))
    if not problems:
        out.append("  all checks passed")
    for p in problems:
        out.extend(format_problem(p, indent="  "))
    for note in findings.notes:
        out.append(f"  note: {note}")


def diagnose(lookup: bool = True, environ=None) -> Tuple[List[str], Findings]:
    """Run every check; returns the report lines and the findings (see :class:`Findings`)."""
    meta = InstalledMetadata()
    findings = Findings()
    out: List[str] = []
    env_report = check_environment(meta)
    findings.version_problems.extend(env_report.problems)
    note = location_note(env_report)
    if note:
        findings.notes.append(note)
    versions_section(meta, out)
    probe = probe_torch()
    devices_section(probe, out)
    imports_ok = imports_section(probe, findings, out)
    folders_section(findings, out, environ)
    nn_v = env_report.versions.get("nnunetv2")
    nnunet_ok = nn_v is not None and satisfies(nn_v, NNUNETV2_RANGE)
    trainers_section(findings, out, lookup=lookup and imports_ok and nnunet_ok, environ=environ)
    summary_section(findings, out)
    return out, findings


@cli_entry
def doctor_main(argv: Optional[Sequence[str]] = None) -> int:
    """``nnUNetv2_sddm_doctor [--no-lookup]``: print the report; exit 0 (all well), 1 or 2."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_doctor",
        description="Check the nnunet-sddm installation: versions (torch/torchvision/nnunetv2 must fit "
                    "together), devices, a real import of torchvision, the nnU-Net folders and the trainer "
                    "lookup; prints a fix for every problem. Exit code 0 when all is well, 2 when the "
                    "torch/torchvision/nnunetv2 versions do not fit together (every other command refuses to "
                    f"start then, unless {SKIP_ENV_VAR}=1), 1 for any other problem.")
    parser.add_argument("--no-lookup", action="store_true",
                        help="skip nnU-Net's trainer lookup (it imports nnunetv2, a few seconds)")
    args = parser.parse_args(argv)
    lines, findings = diagnose(lookup=not args.no_lookup)
    print("\n".join(lines))
    return findings.exit_code
