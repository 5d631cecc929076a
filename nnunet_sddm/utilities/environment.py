"""Cheap check of the installed torch / torchvision / nnunetv2 versions, run before every command.

torchvision pins the torch it was built for (``Requires-Dist: torch==X``), and a CPU build of one
with a CUDA build of the other fails too. A mismatched pair does not fail at install time but at
``import torchvision`` (``operator torchvision::nms does not exist``), which nnunetv2 triggers
through dynamic-network-architectures -> timm, so every nnU-Net command dies with that message.

:func:`startup_check` reads only the installed distributions' metadata (versions and
``Requires-Dist``, as ``importlib.metadata`` finds them; no torch, torchvision or nnunetv2 import,
a few ms) and,
on a problem, prints the versions, what is wrong and the command that fixes it, then exits with
code 2. Every console script runs it first (see ``nnunet_sddm.cli.launch``); setting
``nnUNet_sddm_skip_env_check=1`` skips it. ``python -m nnunet_sddm.utilities.environment`` runs
it alone; ``nnUNetv2_sddm_doctor`` reports it together with devices, folders and the trainers.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Dict, List, Mapping, NamedTuple, Optional, Protocol, Sequence, TextIO, Tuple

#: The versions CI tests together (must equal ``.ci/constraints.txt``; a test checks it).
TESTED: Dict[str, str] = {"torch": "2.14.1", "torchvision": "0.29.1", "nnunetv2": "2.8.1"}

#: Supported nnunetv2 releases (``install_requires`` in setup.cfg; a test checks it).
NNUNETV2_RANGE = ">=2.8,<2.9"
#: Supported torch releases (``install_requires`` in setup.cfg; a test checks it).
TORCH_RANGE = ">=2.1"

#: Set to 1 to skip the start-up check (experts: e.g. source builds with their own labels).
SKIP_ENV_VAR = "nnUNet_sddm_skip_env_check"

#: Exit code of a command stopped by the start-up check (the code of every input error).
EXIT_CODE = 2

#: Index of PyTorch's own builds; ``<label>`` is ``cpu``, ``cu126``, ``rocm6.2``, ...
PYTORCH_INDEX = "https://download.pytorch.org/whl/{label}"

_PIN = "python -m pip install --force-reinstall --no-deps"


# --------------------------------------------------------------------------------------------
# versions and specifiers (the subset of PEP 440 that installed torch builds use)
# --------------------------------------------------------------------------------------------

_VERSION_RE = re.compile(
    r"^\s*v?(?:(?P<epoch>\d+)!)?(?P<release>\d+(?:\.\d+)*)"
    r"(?:[-_.]?(?P<pre_l>a|b|c|rc|alpha|beta|pre|preview)[-_.]?(?P<pre_n>\d*))?"
    r"(?:-(?P<post_n1>\d+)|[-_.]?(?:post|rev|r)[-_.]?(?P<post_n2>\d*))?"
    r"(?:[-_.]?dev[-_.]?(?P<dev_n>\d*))?"
    r"(?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?\s*$", re.IGNORECASE)
_PRE_ORDER = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}
_INF = float("inf")

#: Local labels that name a build variant; other labels (e.g. ``+git1a2b3c``) are not compared.
_VARIANT_RE = re.compile(r"^(cpu|cu\d+|rocm[\d.]+|xpu)$", re.IGNORECASE)


class Version(NamedTuple):
    """A parsed version: ``key`` orders public versions (PEP 440), ``local`` is the build label."""

    text: str
    release: Tuple[int, ...]
    key: tuple
    local: Optional[str]
    is_prerelease: bool = False
    is_postrelease: bool = False

    @property
    def base_key(self) -> tuple:
        """Epoch and release only (``2.6.0rc1`` and ``2.6.post1`` share ``2.6``'s)."""
        return self.key[:2]

    @property
    def public(self) -> str:
        """The version without its local label (``"2.13.0+cpu"`` -> ``"2.13.0"``)."""
        return self.text.split("+", 1)[0].strip()

    @property
    def variant(self) -> Optional[str]:
        """The build variant the local label names (``cpu``, ``cu126``, ``rocm6.2``, ``xpu``) or None."""
        if self.local and _VARIANT_RE.match(self.local):
            return self.local.lower()
        return None


def parse_version(text: str) -> Optional[Version]:
    """Parse ``"2.13.0+cpu"``, ``"2.6.0.dev20241001"``, ``"0.20.0rc1"``...; None if not PEP 440."""
    m = _VERSION_RE.match(text or "")
    if not m:
        return None
    release = tuple(int(p) for p in m.group("release").split("."))
    trimmed = list(release)
    while len(trimmed) > 1 and trimmed[-1] == 0:
        trimmed.pop()
    pre_l, dev_n = m.group("pre_l"), m.group("dev_n")
    post = m.group("post_n1") or m.group("post_n2")
    has_post = m.group("post_n1") is not None or m.group("post_n2") is not None
    has_dev = dev_n is not None
    if pre_l is None:
        pre_key = (-_INF, 0) if (has_dev and not has_post) else (_INF, 0)
    else:
        pre_key = (_PRE_ORDER[pre_l.lower()], int(m.group("pre_n") or 0))
    post_key = int(post or 0) if has_post else -_INF
    dev_key = int(dev_n or 0) if has_dev else _INF
    key = (int(m.group("epoch") or 0), tuple(trimmed), pre_key, post_key, dev_key)
    local = m.group("local")
    return Version(text=text.strip(), release=release, key=key, local=local.lower() if local else None,
                   is_prerelease=pre_l is not None or has_dev, is_postrelease=has_post)


_SPEC_RE = re.compile(r"^\s*(===|==|!=|~=|<=|>=|<|>)\s*([^\s,]+)\s*$")


def _prefix_match(version: Version, prefix: str) -> bool:
    want = parse_version(prefix)
    if want is None:
        return False
    n = len(want.release)
    have = tuple(version.release) + (0,) * max(0, n - len(version.release))
    return want.key[0] == version.key[0] and have[:n] == want.release


def _one_spec(version: Version, op: str, target: str) -> bool:
    if op == "===":
        return version.text == target
    if op in ("==", "!=") and target.endswith(".*"):
        hit = _prefix_match(version, target[:-2])
        return hit if op == "==" else not hit
    want = parse_version(target)
    if want is None:
        return False
    if op in ("==", "!="):
        equal = version.key == want.key and (want.local is None or want.local == version.local)
        return equal if op == "==" else not equal
    if op == "~=":
        prefix = ".".join(str(p) for p in want.release[:-1])
        return version.key >= want.key and _prefix_match(version, prefix)
    if op == "<":  # PEP 440: "<2.6" excludes 2.6's pre-releases
        same_base = version.base_key == want.base_key
        return version.key < want.key and not (version.is_prerelease and not want.is_prerelease and same_base)
    if op == ">":  # PEP 440: ">2.5" excludes 2.5's post-releases (and, as keys are public, its local builds)
        same_base = version.base_key == want.base_key
        return version.key > want.key and not (version.is_postrelease and not want.is_postrelease and same_base)
    return {">=": version.key >= want.key, "<=": version.key <= want.key}[op]


def satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` (e.g. ``"2.13.0+cpu"``) is in ``specifier`` (e.g. ``">=2.8,<2.9"``,
    ``"==2.5.0"``; empty = any). Local labels are ignored unless the specifier names one;
    pre-releases count as in range (as for an installed distribution). False for unparsable input."""
    v = parse_version(version)
    if v is None:
        return False
    for part in (p for p in specifier.split(",") if p.strip()):
        m = _SPEC_RE.match(part)
        if not m or not _one_spec(v, m.group(1), m.group(2)):
            return False
    return True


_REQ_RE = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*"
                     r"(?P<spec>\(?[^;@]*?\)?)\s*(?:;(?P<marker>.*))?$")


def normalize_name(name: str) -> str:
    """Distribution name as pip compares it (``"Nnunet_SDDM"`` -> ``"nnunet-sddm"``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_on(requires: Sequence[str], name: str) -> Optional[str]:
    """The specifier (``"==2.5.0"``, ``">=2.14.0"``, ``""`` for any) that unconditional
    ``Requires-Dist`` lines put on distribution ``name``; None if none does. Lines with an
    environment marker (extras, platforms) are not considered."""
    specs = []
    for line in requires:
        m = _REQ_RE.match(line)
        if not m or normalize_name(m.group("name")) != normalize_name(name) or m.group("marker"):
            continue
        specs.append(m.group("spec").strip().strip("()").replace(" ", ""))
    if not specs:
        return None
    return ",".join(s for s in specs if s)


# --------------------------------------------------------------------------------------------
# installed metadata
# --------------------------------------------------------------------------------------------

def parse_metadata_headers(text: str) -> Dict[str, List[str]]:
    """The header block of a core-metadata file (up to the first blank line): lower-cased name ->
    values in order (``"requires-dist"`` -> ``["numpy", "torch (==2.9.1)"]``); continuation lines join."""
    out: Dict[str, List[str]] = {}
    key = None
    for line in text.split("\n\n", 1)[0].splitlines():
        line = line.rstrip("\r")
        if line[:1] in (" ", "\t") and key is not None:
            out[key][-1] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            break
        key = name.strip().lower()
        out.setdefault(key, []).append(value.strip())
    return out


class MetadataProvider(Protocol):
    """Where the check reads installed distributions from (tests pass a fake one)."""

    def version(self, name: str) -> Optional[str]:
        """Installed version of distribution ``name``, None if it is not installed."""

    def requires(self, name: str) -> Sequence[str]:
        """Its ``Requires-Dist`` lines (empty if it is not installed)."""


class _Record(NamedTuple):
    version: Optional[str]
    requires: Tuple[str, ...]
    location: Optional[str]


def find_dist_info(name: str, path: Optional[Sequence[str]] = None,
                   listings: Optional[Dict[str, List[str]]] = None) -> Optional[str]:
    """The first ``<name>-<version>.dist-info`` folder on ``path`` (default ``sys.path``), the one
    ``importlib.metadata`` and ``import`` use; None if none is found or the first match is of
    another kind (``.egg-info``, a file): the caller then asks ``importlib.metadata``.
    ``listings`` caches folder listings between calls."""
    want = re.sub(r"[-_.]+", "_", name).lower()
    listings = {} if listings is None else listings
    for entry in sys.path if path is None else path:
        folder = entry or "."
        if folder not in listings:
            try:
                listings[folder] = os.listdir(folder)
            except OSError:  # not a folder (a zip, a missing entry)
                listings[folder] = []
        names = listings[folder]
        for fn in names:
            low = fn.lower()
            kind = ".dist-info" if low.endswith(".dist-info") else ".egg-info" if low.endswith(".egg-info") else None
            if kind is None or re.sub(r"[-_.]+", "_", low[:-len(kind)].split("-", 1)[0]) != want:
                continue
            full = os.path.join(folder, fn)
            return full if kind == ".dist-info" and os.path.isfile(os.path.join(full, "METADATA")) else None
    return None


class InstalledMetadata:
    """:class:`MetadataProvider` over the installed distributions: the first one on ``sys.path``,
    i.e. the one ``import`` loads.

    A ``.dist-info`` folder (every wheel and modern editable install) is read directly, header
    block of ``METADATA`` only; anything else goes through ``importlib.metadata``. That keeps the
    start-up check at a few ms: importing ``importlib.metadata`` costs tens of ms, and it parses
    the whole ``METADATA``, long description included, for each version."""

    def __init__(self, path: Optional[Sequence[str]] = None) -> None:
        self._path = path
        self._cache: Dict[str, Optional[_Record]] = {}
        self._listings: Dict[str, List[str]] = {}

    def _record(self, name: str) -> Optional[_Record]:
        if name not in self._cache:
            self._cache[name] = self._read(name)
        return self._cache[name]

    def _read(self, name: str) -> Optional[_Record]:
        info = find_dist_info(name, self._path, self._listings)
        if info is not None:
            with open(os.path.join(info, "METADATA"), encoding="utf-8", errors="replace") as f:
                head = parse_metadata_headers(_header_block(f))
            if head.get("version"):
                return _Record(head["version"][0], tuple(head.get("requires-dist", ())),
                               os.path.normpath(os.path.dirname(info)))
        import importlib.metadata as md

        try:
            dist = md.distribution(name) if self._path is None else next(
                iter(md.distributions(name=name, path=list(self._path))))
        except (md.PackageNotFoundError, StopIteration):
            return None
        try:
            location = os.path.normpath(str(dist.locate_file("")))
        except Exception:  # noqa: BLE001 (a distribution without a file location)
            location = None
        return _Record(dist.version, tuple(dist.requires or ()), location)

    def version(self, name: str) -> Optional[str]:
        rec = self._record(name)
        return None if rec is None else rec.version

    def requires(self, name: str) -> Sequence[str]:
        rec = self._record(name)
        return [] if rec is None else list(rec.requires)

    def location(self, name: str) -> Optional[str]:
        """The folder ``name`` is installed in (``site-packages``, a ``--target`` folder...), None if unknown."""
        rec = self._record(name)
        return None if rec is None else rec.location


def _header_block(f) -> str:
    lines = []
    for line in f:
        if line in ("\n", "\r\n"):  # the blank line ending the headers (a continuation may be blank-looking)
            break
        lines.append(line)
    return "".join(lines)


# --------------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------------

class Fix(NamedTuple):
    """One way to fix a problem: ``how`` (a short caption, may be empty) and the shell commands."""

    how: str
    commands: Tuple[str, ...]


class Problem(NamedTuple):
    """One thing wrong with the installation: what (one sentence) and the ways to fix it."""

    what: str
    fixes: Tuple[Fix, ...] = ()

    @classmethod
    def simple(cls, what: str, *commands: str) -> "Problem":
        """A problem with one uncaptioned fix (``commands`` may be empty)."""
        return cls(what, (Fix("", tuple(commands)),) if commands else ())


class EnvironmentReport:
    """Installed versions (None = not installed), torchvision's torch requirement, where torch and
    torchvision are installed (when they differ), and the problems."""

    def __init__(self, versions: Dict[str, Optional[str]]) -> None:
        self.versions = versions
        self.torchvision_requires_torch: Optional[str] = None
        self.locations: Dict[str, str] = {}
        self.problems: List[Problem] = []

    def __repr__(self) -> str:
        return (f"EnvironmentReport(versions={self.versions}, torchvision_requires_torch="
                f"{self.torchvision_requires_torch!r}, locations={self.locations}, problems={self.problems})")

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems


def tested_pair_fix() -> Fix:
    """Install the tested torch/torchvision pair (regular PyPI builds: CPU and CUDA). The second
    command adds whatever dependency the new builds need that ``--no-deps`` skipped."""
    pair = f"torch=={TESTED['torch']} torchvision=={TESTED['torchvision']}"
    return Fix("the tested pair (regular PyPI builds, CPU and CUDA; the second command adds what --no-deps skipped)",
               (f"{_PIN} {pair}", f"python -m pip install {pair}"))


_NMS = "`import torchvision` fails (\"operator torchvision::nms does not exist\"), and with it every nnU-Net command"


def check_environment(meta: Optional[MetadataProvider] = None) -> EnvironmentReport:
    """Compare the installed torch, torchvision and nnunetv2 (metadata only; nothing is imported).

    Problems: torch or nnunetv2 missing; torch outside :data:`TORCH_RANGE`; nnunetv2 outside
    :data:`NNUNETV2_RANGE`; torchvision missing (nnunetv2 needs it via timm); torch outside the
    ``Requires-Dist`` of the installed torchvision (public versions); torch and torchvision built
    for different variants (local labels ``+cpu``, ``+cu126``, ``+rocm6.2``, ``+xpu`` or none;
    other labels, e.g. source builds' ``+git...``, are not compared).
    """
    meta = InstalledMetadata() if meta is None else meta
    versions = {name: meta.version(name) for name in ("torch", "torchvision", "nnunetv2")}
    report = EnvironmentReport(versions=versions)
    locate = getattr(meta, "location", None)
    if locate is not None:
        places = {n: locate(n) for n in ("torch", "torchvision")}
        if all(places.values()) and places["torch"] != places["torchvision"]:
            report.locations = {n: str(p) for n, p in places.items()}
    torch_v, tv_v, nn_v = versions["torch"], versions["torchvision"], versions["nnunetv2"]
    torch_p = parse_version(torch_v) if torch_v else None
    tv_p = parse_version(tv_v) if tv_v else None

    if torch_v is None:
        report.problems.append(Problem.simple(
            "torch is not installed",
            f"python -m pip install torch=={TESTED['torch']} torchvision=={TESTED['torchvision']}"))
    elif not satisfies(torch_v, TORCH_RANGE):
        report.problems.append(Problem(
            f"torch {torch_v} is installed, but nnunet-sddm needs torch{TORCH_RANGE}", (tested_pair_fix(),)))

    if tv_v is None:
        if torch_v is not None:
            fix = (Fix("", (f"python -m pip install torchvision=={TESTED['torchvision']}",))
                   if torch_p is not None and torch_p.public == TESTED["torch"] else tested_pair_fix())
            report.problems.append(Problem(
                "torchvision is not installed (nnunetv2 imports it through dynamic-network-architectures "
                "-> timm)", (fix,)))
    else:
        spec = requirement_on(meta.requires("torchvision"), "torch")
        report.torchvision_requires_torch = spec
        if torch_v is not None and spec and not satisfies(torch_v, spec):
            fixes = [tested_pair_fix()]
            m = re.fullmatch(r"==([^,*]+)", spec)
            if m:
                fixes.append(Fix(f"keep torchvision {tv_v} and install the torch it requires",
                                 (f"{_PIN} torch=={m.group(1)}",)))
            report.problems.append(Problem(
                f"torchvision {tv_v} requires torch{spec}, but torch {torch_v} is installed: {_NMS}",
                tuple(fixes)))
        elif torch_p is not None and tv_p is not None and (torch_p.local or tv_p.local) \
                and (torch_p.variant or tv_p.variant) and torch_p.variant != tv_p.variant:
            label = torch_p.variant
            fixes = [tested_pair_fix()]
            if label:
                fixes.append(Fix(f"keep torch {torch_v} and install the {label} build of torchvision",
                                 (f"{_PIN} torchvision=={tv_p.public} --index-url "
                                  f"{PYTORCH_INDEX.format(label=label)}",)))
            report.problems.append(Problem(
                f"torch {torch_v} and torchvision {tv_v} are different builds "
                f"({_describe(torch_p.variant)} vs {_describe(tv_p.variant)}): {_NMS}", tuple(fixes)))

    if nn_v is None:
        report.problems.append(Problem.simple("nnunetv2 is not installed",
                                              f"python -m pip install nnunetv2=={TESTED['nnunetv2']}"))
    elif not satisfies(nn_v, NNUNETV2_RANGE):
        report.problems.append(Problem.simple(
            f"nnunetv2 {nn_v} is installed, but nnunet-sddm supports nnunetv2{NNUNETV2_RANGE} only "
            f"(its trainers subclass nnU-Net internals that change between releases)",
            f"python -m pip install nnunetv2=={TESTED['nnunetv2']}"))
    return report


def _describe(variant: Optional[str]) -> str:
    return f"+{variant}" if variant else "no build label"


def format_problem(p: Problem, indent: str = "") -> List[str]:
    """``problem: ...`` and its fixes, one command a line (for the start-up message and the doctor)."""
    lines = [f"{indent}problem: {p.what}"]
    for i, fix in enumerate(p.fixes):
        word = "fix" if i == 0 else "or"
        if not fix.how and len(fix.commands) == 1:
            lines.append(f"{indent}  {word}: {fix.commands[0]}")
            continue
        lines.append(f"{indent}  {word}:" + (f" {fix.how}" if fix.how else ""))
        lines.extend(f"{indent}    {cmd}" for cmd in fix.commands)
    return lines


def location_note(report: EnvironmentReport) -> Optional[str]:
    """A note when torch and torchvision are installed in different folders (e.g. one on
    ``PYTHONPATH``): pip fixes the copy in its own environment, the other one keeps shadowing it."""
    if not report.locations:
        return None
    tv = report.locations["torchvision"]
    return (f"torch and torchvision are installed in different folders; the copy in {tv} (PYTHONPATH? "
            f"--user? --target?) shadows a pip install into this environment: remove or fix that copy")


def format_report(report: EnvironmentReport, skip_hint: bool = True) -> str:
    """The message of a failed check: versions, each problem and its fix commands (multi-line)."""
    lines = ["nnunet-sddm: the installed packages do not work together."]
    for name in ("torch", "torchvision", "nnunetv2"):
        v = report.versions.get(name)
        extra = ""
        if name == "torchvision" and report.torchvision_requires_torch is not None:
            extra = f"  (requires torch{report.torchvision_requires_torch or ' (any)'})"
        elif name == "nnunetv2":
            extra = f"  (supported: {NNUNETV2_RANGE})"
        if name in report.locations:
            extra += f"  in {report.locations[name]}"
        lines.append(f"  {name:<12} {v or 'not installed'}{extra}")
    for p in report.problems:
        lines.extend(format_problem(p))
    note = location_note(report)
    if note:
        lines.append(f"note: {note}")
    lines.append(f"Tested together: torch {TESTED['torch']}, torchvision {TESTED['torchvision']}, "
                 f"nnunetv2 {TESTED['nnunetv2']}. Afterwards, nnUNetv2_sddm_doctor checks the installation.")
    if skip_hint:
        lines.append(f"(Experts: {SKIP_ENV_VAR}=1 skips this check.)")
    return "\n".join(lines)


def skip_requested(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether ``nnUNet_sddm_skip_env_check`` is set to 1/true/yes."""
    environ = os.environ if environ is None else environ
    return environ.get(SKIP_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def startup_check(meta: Optional[MetadataProvider] = None, environ: Optional[Mapping[str, str]] = None,
                  stream: Optional[TextIO] = None) -> None:
    """Run :func:`check_environment` unless skipped; on a problem print :func:`format_report`
    to ``stream`` (default stderr) and exit with :data:`EXIT_CODE` (2)."""
    if skip_requested(environ):
        return
    report = check_environment(meta)
    if not report.ok:
        print(format_report(report), file=sys.stderr if stream is None else stream)
        sys.exit(EXIT_CODE)


def main() -> int:
    """``python -m nnunet_sddm.utilities.environment``: the start-up check alone (exit 0 or 2)."""
    report = check_environment()
    if not report.ok:
        print(format_report(report, skip_hint=False), file=sys.stderr)
        return EXIT_CODE
    v = report.versions
    print(f"ok: torch {v['torch']}, torchvision {v['torchvision']}, nnunetv2 {v['nnunetv2']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
