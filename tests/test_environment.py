"""The start-up environment check, the console-script launcher, the doctor, and the agreement of
README, ``.ci/constraints.txt``, ``.ci/run`` and the tested versions."""
from __future__ import annotations

import ast
import configparser
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from nnunet_sddm.cli import launch
from nnunet_sddm.cli.doctor import Findings, folders_section
from nnunet_sddm.utilities.environment import (
    NNUNETV2_RANGE, SKIP_ENV_VAR, TESTED, TORCH_RANGE, InstalledMetadata, check_environment, format_report,
    parse_metadata_headers, parse_version, requirement_on, satisfies, startup_check)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAVY = ("torch", "torchvision", "nnunetv2", "timm", "dynamic_network_architectures", "numpy")
PAIR_FIX = (f"python -m pip install --force-reinstall --no-deps torch=={TESTED['torch']} "
            f"torchvision=={TESTED['torchvision']}")


class FakeMetadata:
    """A :class:`MetadataProvider` over a dict ``name -> (version, Requires-Dist lines)``."""

    def __init__(self, dists: Dict[str, Tuple[str, Sequence[str]]]):
        self.dists = dists

    def version(self, name: str) -> Optional[str]:
        return self.dists[name][0] if name in self.dists else None

    def requires(self, name: str) -> Sequence[str]:
        return list(self.dists[name][1]) if name in self.dists else []


def fake(torch: Optional[str] = "2.14.1", torchvision: Optional[str] = "0.29.1",
         tv_requires: Sequence[str] = ("numpy", "torch==2.14.1"), nnunetv2: Optional[str] = "2.8.1") -> FakeMetadata:
    dists = {}
    if torch is not None:
        dists["torch"] = (torch, ["filelock"])
    if torchvision is not None:
        dists["torchvision"] = (torchvision, list(tv_requires))
    if nnunetv2 is not None:
        dists["nnunetv2"] = (nnunetv2, ["torch>=2.1.2"])
    return FakeMetadata(dists)


def _commands(report) -> List[str]:
    return [c for p in report.problems for f in p.fixes for c in f.commands]


# ---------------------------------------------------------------------------------------------
# mismatch detection (fake metadata)
# ---------------------------------------------------------------------------------------------

def test_matching_pairs_pass():
    assert check_environment(fake()).ok
    assert check_environment(fake(tv_requires=["torch (>=2.14.0)"])).ok  # a range, as source builds write it
    assert check_environment(fake("2.13.0+cpu", "0.28.0+cpu", ["torch==2.13.0"])).ok
    assert check_environment(fake("2.5.0+cu124", "0.20.0+cu124", ["torch==2.5.0+cu124"])).ok
    # source builds carry git labels: not a build variant, not compared
    assert check_environment(fake("2.6.0a0+git1a2b3c", "0.21.0a0+git9f8e7d", ["torch"])).ok


def test_exact_pin_mismatch_names_versions_and_fixes():
    report = check_environment(fake(torchvision="0.20.0", tv_requires=["numpy", "torch==2.5.0"]))
    assert not report.ok and len(report.problems) == 1
    what = report.problems[0].what
    assert "0.20.0" in what and "torch==2.5.0" in what and "2.14.1" in what and "nms" in what
    cmds = _commands(report)
    assert PAIR_FIX in cmds
    assert "python -m pip install --force-reinstall --no-deps torch==2.5.0" in cmds
    assert report.torchvision_requires_torch == "==2.5.0"
    text = format_report(report)
    assert PAIR_FIX in text and "0.20.0" in text and "2.14.1" in text and SKIP_ENV_VAR in text


def test_range_requirement_mismatch():
    report = check_environment(fake(torch="2.13.0", tv_requires=["torch (>=2.14.0)"]))
    assert len(report.problems) == 1 and "torch>=2.14.0" in report.problems[0].what
    assert PAIR_FIX in _commands(report)
    # no exact pin: no "install the torch it requires" alternative
    assert not any(c.endswith("torch==2.14.0") for c in _commands(report))


def test_local_label_mismatch():
    report = check_environment(fake("2.13.0+cpu", "0.28.0", ["torch==2.13.0"]))
    assert len(report.problems) == 1
    what = report.problems[0].what
    assert "+cpu" in what and "no build label" in what
    cmds = _commands(report)
    assert PAIR_FIX in cmds
    assert ("python -m pip install --force-reinstall --no-deps torchvision==0.28.0 --index-url "
            "https://download.pytorch.org/whl/cpu") in cmds
    assert not check_environment(fake("2.13.0", "0.28.0+cpu", ["torch==2.13.0"])).ok
    assert not check_environment(fake("2.5.0+cu121", "0.20.0+cu124", ["torch==2.5.0"])).ok


def test_missing_and_unsupported_distributions():
    assert [p.what for p in check_environment(fake(torch=None)).problems] == ["torch is not installed"]
    r = check_environment(fake(torchvision=None))
    assert len(r.problems) == 1 and "torchvision is not installed" in r.problems[0].what
    assert _commands(r) == [f"python -m pip install torchvision=={TESTED['torchvision']}"]
    r = check_environment(fake(nnunetv2=None))
    assert [p.what for p in r.problems] == ["nnunetv2 is not installed"]
    assert _commands(r) == [f"python -m pip install nnunetv2=={TESTED['nnunetv2']}"]
    for bad in ("2.9.0", "2.7.1", "3.0"):
        r = check_environment(fake(nnunetv2=bad))
        assert len(r.problems) == 1 and bad in r.problems[0].what and NNUNETV2_RANGE in r.problems[0].what
    assert check_environment(fake(nnunetv2="2.8.0")).ok
    r = check_environment(fake(torch="2.0.1", tv_requires=["torch==2.0.1"]))
    assert len(r.problems) == 1 and TORCH_RANGE in r.problems[0].what


def test_requirement_parsing_ignores_conditional_lines():
    lines = ["numpy", "torch (==2.9.1)", "torch==1.0 ; extra == 'old'", "torchaudio==2.9.1",
             "pillow (!=8.3.*,>=5.3.0)"]
    assert requirement_on(lines, "torch") == "==2.9.1"
    assert requirement_on(lines, "Pillow") == "!=8.3.*,>=5.3.0"
    assert requirement_on(lines, "scipy") is None
    assert requirement_on(["torch"], "torch") == ""


def test_metadata_headers_and_installed_provider():
    text = ("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.24.1\nRequires-Dist: numpy\n"
            "Requires-Dist: torch (==2.9.1)\nSummary: a long\n   summary\n\nRequires-Dist: not-a-header\n")
    h = parse_metadata_headers(text)
    assert h["version"] == ["0.24.1"] and h["requires-dist"] == ["numpy", "torch (==2.9.1)"]
    assert h["summary"] == ["a long summary"]
    import importlib.metadata as md

    meta = InstalledMetadata()
    names = {d.metadata["Name"] for d in md.distributions()}
    assert {"torch", "torchvision", "nnunetv2", "nnunet-sddm"} <= {n.lower() for n in names}
    for name in names:  # the direct reader agrees with importlib.metadata on every installed distribution
        assert meta.version(name) == md.version(name), name
        assert list(meta.requires(name)) == list(md.requires(name) or []), name
    assert meta.version("no-such-distribution-xyz") is None and meta.requires("no-such-distribution-xyz") == []


def test_installed_metadata_order_and_fallback(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    _fake_torchvision(first, "0.20.0", "2.5.0")
    _fake_torchvision(second, "0.21.0", "2.6.0")
    meta = InstalledMetadata(path=[str(tmp_path / "missing"), str(first), str(second)])
    assert meta.version("torchvision") == "0.20.0" and meta.location("torchvision") == str(first)
    assert meta.requires("torchvision") == ["numpy", "torch==2.5.0"]
    # an .egg-info first on the path: read through importlib.metadata (PKG-INFO + requires.txt)
    egg = tmp_path / "egg" / "torchvision.egg-info"
    egg.mkdir(parents=True)
    (egg / "PKG-INFO").write_text("Metadata-Version: 1.2\nName: torchvision\nVersion: 0.19.0\n")
    (egg / "requires.txt").write_text("numpy\ntorch==2.4.0\n")
    meta = InstalledMetadata(path=[str(tmp_path / "egg"), str(first)])
    assert meta.version("torchvision") == "0.19.0"
    assert requirement_on(meta.requires("torchvision"), "torch") == "==2.4.0"


def test_version_parsing():
    v = parse_version("2.13.0+cpu")
    assert v.public == "2.13.0" and v.local == "cpu" and v.variant == "cpu"
    assert parse_version("2.6.0a0+git1a2b3c").variant is None
    assert parse_version("0.20.0").local is None
    assert parse_version("not a version") is None
    assert not satisfies("garbage", ">=1")


def test_satisfies_agrees_with_packaging():
    packaging = pytest.importorskip("packaging.specifiers")
    from packaging.version import Version

    versions = ["2.5.0", "2.5.0+cpu", "2.5", "2.5.0.0", "2.5.1", "2.14.1", "2.6.0.dev20241001",
                "2.6.0a0+git1234", "2.5.0rc1", "2.5.0.post1", "1!1.0", "2.4.9", "2.8.1", "2.9.0", "2.8.0rc2",
                "2.9.0.dev1", "2.5.0-1", "2.5.0.post1.dev2", "2.6.0rc1+cpu", "0.29.1"]
    specs = ["==2.5.0", "==2.5", "==2.5.0+cpu", "!=2.5.0", ">=2.14.0", "<2.9", ">=2.8,<2.9", "~=2.5", "~=2.5.0",
             "==2.5.*", "!=2.5.*", ">2.5.0", "<=2.5.0", "", ">=2.6.0.dev0", "<2.6", ">2.5", "<2.6rc1",
             "<2.5.0rc2", ">=2.1"]
    for v in versions:
        for s in specs:
            want = packaging.SpecifierSet(s).contains(Version(v), prereleases=True)
            assert satisfies(v, s) == want, (v, s)


def test_startup_check_exits_2_and_can_be_skipped():
    bad = fake(torchvision="0.20.0", tv_requires=["torch==2.5.0"])
    stream = io.StringIO()
    with pytest.raises(SystemExit) as e:
        startup_check(bad, environ={}, stream=stream)
    assert e.value.code == 2
    assert PAIR_FIX in stream.getvalue() and "0.20.0" in stream.getvalue()
    startup_check(bad, environ={SKIP_ENV_VAR: "1"}, stream=stream)  # returns
    startup_check(fake(), environ={}, stream=stream)  # all well: returns


# ---------------------------------------------------------------------------------------------
# tested versions: constants, constraints, setup.cfg, README, .ci/run
# ---------------------------------------------------------------------------------------------

def _constraints() -> Dict[str, str]:
    pins = {}
    for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f".ci/constraints.txt: {line!r} is not an exact pin"
            pins[name.strip().lower()] = version.strip()
    return pins


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def test_constraints_equal_tested():
    assert _constraints() == TESTED
    for name, version in TESTED.items():  # plain releases: the fix commands must resolve on PyPI
        v = parse_version(version)
        assert v is not None and v.local is None and not v.is_prerelease, (name, version)


def test_supported_ranges_equal_setup_cfg():
    reqs = [r.strip().replace(" ", "") for r in _setup_cfg()["options"]["install_requires"].splitlines() if r.strip()]
    assert f"nnunetv2{NNUNETV2_RANGE}" in reqs
    assert f"torch{TORCH_RANGE}" in reqs
    assert satisfies(TESTED["nnunetv2"], NNUNETV2_RANGE) and satisfies(TESTED["torch"], TORCH_RANGE)


def test_readme_install_line_and_pins_match_constraints():
    readme = (REPO / "README.md").read_text()
    line = 'python -m pip install -c .ci/constraints.txt -e ".[test]"'
    assert any(ln.strip() == line for ln in readme.splitlines()), f"README.md lacks the install line {line}"
    pins = _constraints()
    mentioned = re.findall(r"\b(torchvision|torch|nnunetv2)==([0-9][0-9A-Za-z.+!]*[0-9A-Za-z])", readme)
    for name, version in mentioned:
        assert version == pins[name], f"README.md mentions {name}=={version}, .ci/constraints.txt pins {pins[name]}"


def test_ci_installs_with_the_constraints():
    script = (REPO / ".ci" / "run").read_text()
    installs = [ln for ln in script.splitlines() if re.search(r"pip install\b.*-e\b", ln) and not ln.lstrip().startswith("#")]
    assert installs, ".ci/run installs nothing"
    assert all("-c .ci/constraints.txt" in ln for ln in installs), installs


# ---------------------------------------------------------------------------------------------
# the launcher
# ---------------------------------------------------------------------------------------------

def _console_scripts() -> Dict[str, str]:
    block = _setup_cfg()["options.entry_points"]["console_scripts"]
    out = {}
    for line in block.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            name, _, target = line.partition("=")
            out[name.strip()] = target.strip()
    return out


def test_every_console_script_goes_through_the_launcher():
    scripts = _console_scripts()
    assert set(scripts) == set(launch.SCRIPTS)
    for name, target in scripts.items():
        assert target == f"nnunet_sddm.cli.launch:{name}", name
        assert callable(getattr(launch, name))
    for name, target in launch.SCRIPTS.items():  # every target exists (parsed, not imported: no torch here)
        module, _, func = target.partition(":")
        path = REPO / (module.replace(".", "/") + ".py")
        names = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert func in names, f"{name}: {module} defines no {func}"


def test_installed_console_scripts_are_the_launcher():
    """Fails after an entry-point change until ``python -m pip install --no-deps -e .`` is re-run."""
    import importlib.metadata as md

    installed = {ep.name: ep.value for ep in md.entry_points(group="console_scripts")
                 if ep.value.startswith("nnunet_sddm.cli.launch:")}
    assert installed == _console_scripts()


def _fake_torchvision(root: Path, version: str = "0.20.0", torch_pin: str = "2.5.0") -> Path:
    info = root / f"torchvision-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torchvision\nVersion: {version}\n"
                                   f"Requires-Dist: numpy\nRequires-Dist: torch=={torch_pin}\n")
    return root


def _env_with(path: Path, **extra: str) -> Dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(path)] + [p for p in [e.get("PYTHONPATH")] if p])
    e.pop(SKIP_ENV_VAR, None)
    e.update(extra)
    return e


def _script(name: str) -> List[str]:
    exe = BIN / name
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "nnunet_sddm.cli.launch", name]


def _installed_torch() -> str:
    import importlib.metadata as md

    return md.version("torch")


def test_console_script_stops_a_mismatched_pair(tmp_path):
    fake_root = _fake_torchvision(tmp_path / "site")
    for cmd in (_script("nnUNetv2_sddm_adapt"), [sys.executable, "-m", "nnunet_sddm.cli.launch",
                                                 "nnUNetv2_sddm_adapt"]):
        r = subprocess.run(cmd + ["--help"], env=_env_with(fake_root), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert "0.20.0" in r.stderr and "torch==2.5.0" in r.stderr and _installed_torch() in r.stderr
        assert PAIR_FIX in r.stderr and SKIP_ENV_VAR in r.stderr
        assert "usage:" not in r.stdout
    # experts can skip it: the command runs
    r = subprocess.run(_script("nnUNetv2_sddm_adapt") + ["--help"], env=_env_with(fake_root, **{SKIP_ENV_VAR: "1"}),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: nnUNetv2_sddm_adapt" in r.stdout, r.stderr


def test_check_runs_before_any_heavy_import(tmp_path):
    fake_root = _fake_torchvision(tmp_path / "site")
    code = ("import sys\nfrom nnunet_sddm.cli import launch\nsys.argv = ['nnUNetv2_sddm_study', '--help']\n"
            "try:\n    launch.run('nnUNetv2_sddm_study')\nexcept SystemExit as e:\n    code = e.code\n"
            f"print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}), code)\n")
    r = subprocess.run([sys.executable, "-c", code], env=_env_with(fake_root), capture_output=True, text=True,
                       timeout=120)
    assert "LOADED [] 2" in r.stdout, r.stdout + r.stderr


def test_light_packages_stay_light():
    code = ("import sys\nimport nnunet_sddm, nnunet_sddm.cli, nnunet_sddm.cli.launch, nnunet_sddm.utilities.environment\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_environment_module_passes_in_this_environment():
    r = subprocess.run([sys.executable, "-m", "nnunet_sddm.utilities.environment"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok: torch"), r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# the doctor
# ---------------------------------------------------------------------------------------------

def test_folders_section_reports_each_state(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "file").write_text("x")
    environ = {"nnUNet_raw": str(tmp_path / "ok"), "nnUNet_preprocessed": str(tmp_path / "missing"),
               "nnUNet_results": str(tmp_path / "file")}
    findings, out = Findings(), []
    folders_section(findings, out, environ)
    text = "\n".join(out)
    assert "(ok, writable)" in text and "DOES NOT EXIST" in text and "IS NOT A FOLDER" in text
    assert [f.commands for p in findings.problems for f in p.fixes] == [(f"mkdir -p {tmp_path / 'missing'}",)]
    assert findings.exit_code == 1
    findings, out = Findings(), []
    folders_section(findings, out, {})  # unset: notes (the study needs none of them), exit 0
    assert not findings.problems and findings.exit_code == 0
    assert len(findings.notes) == 3 and all("is not set" in n for n in findings.notes)


def _nnunet_env(tmp_path: Path) -> Dict[str, str]:
    e = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        e[var] = str(tmp_path / var)
    e.pop("nnUNet_extTrainer", None)
    e.pop(SKIP_ENV_VAR, None)
    return e


def test_doctor_reports_a_healthy_installation(tmp_path):
    r = subprocess.run(_script("nnUNetv2_sddm_doctor"), env=_nnunet_env(tmp_path), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for needle in ("versions", "devices", "nnU-Net folders", "trainers", "summary", "all checks passed",
                   "torchvision::nms is registered", "(ok, writable)", "SD-DM trainers resolve through nnU-Net",
                   "MedPy", "SimpleITK", "CUDA", "CPU"):
        assert needle in out, needle
    assert re.search(r"^\s+torch\s+\d", out, re.M) and re.search(r"^\s+nnunetv2\s+2\.8", out, re.M)
    assert str(tmp_path / "nnUNet_raw") in out
    assert "export nnUNet_extTrainer=$(nnUNetv2_sddm_trainer_path)" in out  # a note, not a problem


def test_doctor_exit_codes_for_problems(tmp_path):
    e = _nnunet_env(tmp_path)
    e["nnUNet_results"] = str(tmp_path / "missing_results")
    r = subprocess.run(_script("nnUNetv2_sddm_doctor") + ["--no-lookup"], env=e, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "missing_results does not exist" in r.stdout and f"mkdir -p {tmp_path / 'missing_results'}" in r.stdout
    e.pop("nnUNet_results")
    r = subprocess.run(_script("nnUNetv2_sddm_doctor") + ["--no-lookup"], env=e, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "nnUNet_results is not set" in r.stdout, r.stdout + r.stderr
    fake_root = _fake_torchvision(tmp_path / "site")
    r = subprocess.run(_script("nnUNetv2_sddm_doctor") + ["--no-lookup"], env=_env_with(fake_root, **{
        k: v for k, v in e.items() if k.startswith("nnUNet_")}), capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "torchvision 0.20.0 requires torch==2.5.0" in r.stdout and PAIR_FIX in r.stdout
    assert "versions" in r.stdout and "nnU-Net folders" in r.stdout  # the full report, not just the check
