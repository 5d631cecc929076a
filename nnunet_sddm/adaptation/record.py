"""The run record of an adaptation into a folder: what the run is, and which outputs it finished.

A record is a JSON file (``sddm_adapt.json`` of ``nnUNetv2_sddm_adapt``, ``sddm_synthesize.json``
in a synthesis' staging folder) holding

- the run's *identity*: package version, model folder and the SHA-256 of its weight files,
  sampler settings, amp, input and cases (the caller's keys); a resumed run must match it on the
  *resume keys*;
- ``finished``: ``{output path relative to the record's folder: SHA-256 of its bytes}`` for every
  output the run wrote
  completely (the output is written atomically first, then entered here).

Resume trusts the record alone: an output counts as done only if ``finished`` names it AND the
file's digest matches. A file of an output's name that the record does not list (a leftover
of another tool, an unadapted copy of the input) is never taken for a result: in a folder that a
record owns it is adapted again; where no record exists yet, the run refuses it by name
(``--overwrite`` replaces it). A record that lists no finished output protects nothing: a run with
another identity replaces it (the retry of a run that failed before writing anything is not blocked).

Under ``torchrun`` rank 0 owns the record file; every other rank enters its finished outputs in a
hidden side file ``.<record>.rank<k>.json`` that rank 0 merges (at the next start or at the end).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from nnunet_sddm.utilities.distributed import Ranks
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import write_json

#: Key of the finished outputs in a record.
FINISHED = "finished"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON object at ``path``; ``None`` if missing; ``SDDMError`` naming it if unreadable."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SDDMError(f"{path}: unreadable run record ({e}); use --overwrite") from None
    if not isinstance(obj, dict):
        raise SDDMError(f"{path}: not a run record (expected a JSON object); use --overwrite")
    return obj


class RunRecord:
    """The record file of one adaptation run into ``folder`` (see the module docstring).

    Args:
        path: the record file (``FOLDER/sddm_adapt.json``).
        identity: the run's description (JSON-able; must not contain ``finished``).
        resume_keys: the identity keys a resumed run must match.
        ranks: this process's place (rank 0 writes the record file).
    """

    def __init__(self, path: Path, identity: Mapping[str, Any], resume_keys: Sequence[str],
                 ranks: Ranks = Ranks()) -> None:
        self.path = Path(path)
        self.identity = {k: v for k, v in identity.items() if k != FINISHED}
        self.resume_keys = tuple(resume_keys)
        self.ranks = ranks
        self.finished: Dict[str, str] = {}

    def key(self, output: Path) -> str:
        """How ``output`` is named in ``finished``: its path relative to the record's folder."""
        return os.path.relpath(Path(output), self.path.parent)

    # ------------------------------------------------------------------ side files of other ranks
    def _side_file(self, rank: int) -> Path:
        return self.path.with_name(f".{self.path.name}.rank{rank}.json")

    def _side_files(self) -> List[Path]:
        return sorted(self.path.parent.glob(f".{self.path.name}.rank*.json"))

    # ------------------------------------------------------------------ opening (rank 0)
    def differences(self, old: Mapping[str, Any]) -> List[str]:
        """The resume keys on which ``old`` differs from this run (``batch_size`` counts only
        when either record has it: it changes results only with the reference behaviour)."""
        keys = self.resume_keys + (("batch_size",) if "batch_size" in self.identity or "batch_size" in old else ())
        return [k for k in keys if old.get(k) != self.identity.get(k)]

    def open(self, outputs: Sequence[Path], overwrite: bool = False) -> None:
        """Rank 0: check the folder against an existing record and write this run's record.

        ``outputs``: every output path the run will write. Refuses (``SDDMError``, nothing
        changed) a folder holding finished outputs of a run with another identity, and, where no
        record of this run exists, files in the way of an output. With ``overwrite`` the outputs
        and the old record are deleted first (outputs first: an interrupted ``--overwrite`` never
        leaves old outputs under a new record)."""
        old = _read(self.path) if not overwrite else None
        if old is not None:
            for side in self._side_files():  # finished outputs of other ranks of the same run
                part = _read(side) or {}
                old.setdefault(FINISHED, {}).update(part.get(FINISHED, {}))
        old_finished = dict((old or {}).get(FINISHED) or {})
        same_run = old is not None and not self.differences(old)
        if old is not None and not same_run and old_finished:
            raise SDDMError(f"{self.path.parent} holds outputs of a run with different "
                            f"{', '.join(self.differences(old))} (see {self.path}); use --overwrite or "
                            f"another output folder")
        if not same_run and not overwrite:
            in_the_way = [o for o in outputs if o.exists()]
            if in_the_way:
                raise SDDMError(f"{in_the_way[0]}: a file of this name is in the way of an output and no record "
                                f"of this run says it wrote it ({len(in_the_way)} such file(s) in "
                                f"{in_the_way[0].parent}); use --overwrite to replace them or another output folder")
        if overwrite:
            for o in outputs:
                if o.is_file():
                    o.unlink()
        for side in self._side_files():
            side.unlink()
        if overwrite and self.path.is_file():
            self.path.unlink()
        names = {self.key(o) for o in outputs}
        self.finished = {n: d for n, d in old_finished.items() if n in names} if same_run else {}
        self._save()

    def load(self) -> None:
        """Ranks other than 0: read the record rank 0 has written (after a barrier)."""
        rec = _read(self.path) or {}
        self.finished = dict(rec.get(FINISHED) or {})

    # ------------------------------------------------------------------ progress
    def is_finished(self, output: Path) -> bool:
        """True iff the record lists ``output`` and the file's bytes have the recorded digest."""
        digest = self.finished.get(self.key(output))
        return digest is not None and output.is_file() and sha256_file(output) == digest

    def mark_finished(self, output: Path) -> None:
        """Enter a completely written ``output`` (its digest) and save the record atomically."""
        self.finished[self.key(output)] = sha256_file(output)
        self._save()

    def merge_ranks(self) -> None:
        """Rank 0, after all ranks are done: take the other ranks' finished outputs into the record."""
        for side in self._side_files():
            self.finished.update((_read(side) or {}).get(FINISHED, {}))
        self._save()
        for side in self._side_files():
            side.unlink()

    def _save(self) -> None:
        if self.ranks.is_main:
            write_json({**self.identity, FINISHED: dict(sorted(self.finished.items()))}, self.path)
        else:
            write_json({FINISHED: dict(sorted(self.finished.items()))}, self._side_file(self.ranks.rank))
