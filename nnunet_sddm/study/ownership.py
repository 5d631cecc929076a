"""The study's ownership ledger: which paths in the user's nnU-Net folders a study created.

With ``nnunet.folders = "environment"`` a study writes datasets, plans and models into the user's
``$nnUNet_*`` folders. Before a stage writes there it records the paths in ``study_created.json``
(``{"version": 1, "created": {stage: [absolute path, ...]}}``, written atomically, before the
files exist, so an interrupted stage's partial outputs are the study's too). Clean-up deletes
only recorded paths (or their children); anything else in the way is refused by name. With
``nnunet.folders = "study"`` everything under the study folder is the study's own.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.stages import remove_paths
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import write_json

#: The paths the study created in the user's nnU-Net folders, per stage.
CREATED_FILE = "study_created.json"


def _path_key(path: Path) -> str:
    return os.path.abspath(os.fspath(path))


def _present(path: Path) -> bool:
    """Exists, or is a (possibly dangling) link."""
    return Path(path).exists() or Path(path).is_symlink()


def load_created(ctx: StudyContext) -> Dict[str, List[str]]:
    """The record of created paths (``{stage: [absolute path, ...]}``; empty if none yet)."""
    f = ctx.out / CREATED_FILE
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
        created = data["created"]
        if not isinstance(created, dict) or not all(isinstance(v, list) for v in created.values()):
            raise ValueError("'created' must map stage names to lists of paths")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SDDMError(f"{f}: unreadable record of the paths this study created ({e}); the study deletes "
                        f"nothing in your nnU-Net folders without it. Restore it, or remove the study's "
                        f"datasets/models by hand and delete {f}") from None
    return created


def created_by_study(ctx: StudyContext, path: Path, created: Optional[Dict[str, List[str]]] = None) -> bool:
    """True if ``path`` is the study's own: under its own nnU-Net folders (``nnunet.folders =
    "study"``), or recorded in ``CREATED_FILE`` (itself or a parent folder) in environment mode.
    ``created``: that record if already read (else it is read here)."""
    key = Path(_path_key(path))
    if not ctx.environment_mode:
        return key.is_relative_to(_path_key(ctx.out))
    created = load_created(ctx) if created is None else created
    recorded = {Path(p) for paths in created.values() for p in paths}
    return any(k in recorded for k in (key, *key.parents))


def guard_user_outputs(ctx: StudyContext, stage: str, paths: Sequence[Path]) -> None:
    """Before ``stage`` writes ``paths`` into the user's nnU-Net folders (environment mode): refuse
    (``SDDMError`` naming them) if any exists and was not created by this study; otherwise record
    them as created by ``stage``. Nothing happens with ``nnunet.folders = "study"``."""
    if not ctx.environment_mode:
        return
    created = load_created(ctx)
    foreign = [str(p) for p in paths if _present(p) and not created_by_study(ctx, p, created)]
    if foreign:
        raise SDDMError(f"stage {stage}: {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} exist(s) in "
                        f"your nnU-Net folders and were not made by this study (not in "
                        f"{ctx.out / CREATED_FILE}); the study never replaces or deletes them. Remove them, "
                        f"choose other dataset ids, or use nnunet.folders = 'study'")
    old = [p for p in created.get(stage, []) if _present(Path(p))]
    created[stage] = sorted(set(old) | {_path_key(p) for p in paths})
    write_json({"version": 1, "created": created}, ctx.out / CREATED_FILE)


def clean_study_outputs(ctx: StudyContext, stage: str, paths: Sequence[Path]) -> None:
    """Delete the old ``paths`` of ``stage`` before it runs afresh; only paths this study created
    are ever deleted (anything else in the way is refused by ``guard_user_outputs``)."""
    guard_user_outputs(ctx, stage, paths)
    existing = [Path(p) for p in paths if _present(p)]
    created = load_created(ctx) if ctx.environment_mode else None
    if any(not created_by_study(ctx, p, created) for p in existing):  # study mode: outside the study folder
        raise SDDMError(f"stage {stage}: refusing to delete {', '.join(str(p) for p in existing)}: not in the "
                        f"study folder {ctx.out}")
    remove_paths(existing)
