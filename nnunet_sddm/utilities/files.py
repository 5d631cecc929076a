"""Atomic outputs: nothing half-written is ever left under a final name."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, List, Union

PathLike = Union[str, os.PathLike]


#: Ending of the hidden folders that hold files being written (``.CASE_0000.nii.gz.<random>.sddm-tmp``).
TEMP_SUFFIX = ".sddm-tmp"

#: Temporary files of earlier versions (``.CASE_0000.<8 random chars>.nii.gz``, from ``mkstemp``), which
#: nnU-Net's folder listing mistakes for images when a killed run leaves them behind.
_LEGACY_TEMP = re.compile(r"^\.[^.]+\.[a-z0-9_]{8}(\.[^.]+)+$")


@contextlib.contextmanager
def atomic_path(final: PathLike) -> Iterator[Path]:
    """Yield a temporary path for ``final``; on success it is renamed to ``final`` (atomic on
    POSIX), on error it is removed.

    The temporary file has ``final``'s own name (so writers that dispatch on the ending, such as
    SimpleITK or ``np.save``, write the right format) but lies in a hidden folder
    ``.<name>.<random>.sddm-tmp`` next to ``final``: a run killed mid-write leaves no file that
    nnU-Net's folder listing could take for an image (see ``remove_stale_temp``).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name[:100]}.", suffix=TEMP_SUFFIX, dir=final.parent))
    tmp_path = work / final.name
    try:
        tmp_path.touch()
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def is_stale_temp(path: PathLike) -> bool:
    """True for a leftover of ``atomic_path`` (a hidden ``*.sddm-tmp`` folder, or a hidden
    ``.CASE.<random>.<ending>`` file of earlier versions)."""
    path = Path(path)
    if path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX) and path.is_dir():
        return True
    return bool(_LEGACY_TEMP.match(path.name)) and path.is_file()


def remove_stale_temp(folder: PathLike) -> List[Path]:
    """Delete the leftovers of interrupted atomic writes directly in ``folder`` (only entries of
    our own temporary naming, see ``is_stale_temp``); returns what was removed. Call it only
    while no other process writes into ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if is_stale_temp(entry):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


def read_json(path: PathLike) -> Any:
    """Parse a JSON file; ``SDDMError`` naming the file if it is not valid JSON (callers check
    for a missing file themselves, with their own hint)."""
    from nnunet_sddm.utilities.errors import SDDMError

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SDDMError(f"{path}: not valid JSON ({e})") from None


def write_json(obj: Any, path: PathLike, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, sort_keys=False)
            f.write("\n")


def write_text(text: str, path: PathLike) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


@contextlib.contextmanager
def staging_dir(final: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a hidden temporary name next to ``final`` and move it into place
    only when the block succeeds. An existing ``final`` is replaced only if ``overwrite``
    (the caller checks and refuses earlier with a clear message); on error the staging folder
    is deleted and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} appeared while it was being built")
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
