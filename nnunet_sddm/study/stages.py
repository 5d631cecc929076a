"""A small stage runner: run stages in order, skip the ones that are done and unchanged.

Each :class:`Stage` declares what it depends on: ``inputs(ctx)`` (a JSON-able description of the
settings and input files it reads) and ``after`` (the upstream stages whose outputs it reads),
and ``outputs(ctx)``, the files and folders it produces. The runner keeps one state file
(``study_state.json`` in the study folder) with, per stage::

    {"status": "running" | "done", "fingerprint": sha256(inputs, upstream fingerprints and output digests),
     "outputs_digest": sha256(relative path, size, mtime of every output file),
     "seconds": wall time, "cpu_seconds": CPU time of the study process and its finished
     subprocesses (comparable on a busy machine), "started": ..., "finished": ..., "result": {...}}

A stage is skipped when it is ``done``, its fingerprint is unchanged and its outputs are still
exactly what it wrote; otherwise it runs. Because the fingerprint contains the upstream stages'
fingerprints and output digests, a stage that re-ran invalidates everything downstream of it, also
when it has no output files of its own (a given model or a user's dataset: a change of those is in
its inputs, so in its fingerprint). A stage found ``running`` with an unchanged fingerprint was
interrupted: it is run again with ``resume=True`` (stages keep their finished parts, e.g. trained
models, adapted images); in every other case its
old outputs are removed first (``clean``). ``from_stage`` forces a fresh run of that stage and all
later ones. The state file is written atomically after every change, so a killed study loses at
most the stage it was in.

A stage whose ``enabled(ctx)`` is False (an optional part of the study that is switched off) is
not run and not recorded, and it is left out of its downstream stages' fingerprints: switching an
optional part on or off changes nothing for the studies that never had it. Switched off after it
ran, its old outputs are removed (``clean``) with its record.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import write_json

STATE_FILE = "study_state.json"
STATE_VERSION = 1


@dataclass
class Stage:
    """One step of a study.

    run(ctx, resume) -> result: does the work, returns a JSON-able summary (recorded in the state).
    inputs(ctx): JSON-able settings/input description; outputs(ctx): paths it writes;
    after: names of upstream stages; clean(ctx): remove old outputs (default: ``outputs``);
    enabled(ctx): False when the stage is not part of this study (default: always part of it).
    """

    name: str
    description: str
    run: Callable[[Any, bool], Dict[str, Any]]
    inputs: Callable[[Any], Any]
    outputs: Callable[[Any], Sequence[Path]]
    after: Sequence[str] = ()
    clean: Optional[Callable[[Any], None]] = None
    enabled: Optional[Callable[[Any], bool]] = None


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys; paths as strings)."""
    text = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _files_under(p: Path) -> Iterable[Path]:
    if p.is_file():
        yield p
    elif p.is_dir():
        for root, dirs, files in os.walk(p, followlinks=True):
            dirs.sort()
            for f in sorted(files):
                yield Path(root) / f


def digest_paths(paths: Sequence[Path], root: Optional[Path] = None) -> Optional[str]:
    """sha256 over (path, size, mtime_ns) of every file under ``paths``; None if any path is
    missing (the outputs are incomplete). Paths are recorded relative to ``root`` when given."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        if not p.exists():
            return None
        for f in _files_under(p):
            st = f.stat()
            name = str(f.relative_to(root)) if root is not None and f.is_relative_to(root) else str(f)
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_listing(folder: Path) -> List[List[Any]]:
    """``[name, size, mtime_ns]`` of every file under ``folder`` (an input's identity)."""
    folder = Path(folder)
    return [[str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns] for f in _files_under(folder)]


def remove_paths(paths: Sequence[Path]) -> None:
    """Delete files, folders and links (a link is unlinked, never followed)."""
    for p in paths:
        p = Path(p)
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished child processes."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class StageRunner:
    """Runs ``stages`` with their state kept in ``state_dir / study_state.json``.

    log: a function printing one line; on_stage_start(name): called right before a stage runs
    (tests use it to simulate an interruption).
    """

    def __init__(self, stages: Sequence[Stage], state_dir: Path, log: Callable[[str], None] = print,
                 on_stage_start: Optional[Callable[[str], None]] = None):
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stage names in {names}")
        for s in stages:
            for u in s.after:
                if u not in names or names.index(u) >= names.index(s.name):
                    raise ValueError(f"stage {s.name}: upstream {u!r} is not an earlier stage")
        self.stages = list(stages)
        self.state_path = Path(state_dir) / STATE_FILE
        self.log = log
        self.on_stage_start = on_stage_start
        self.state = self._load()

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.stages]

    def _load(self) -> Dict[str, Any]:
        if not self.state_path.is_file():
            return {"version": STATE_VERSION, "stages": {}}
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SDDMError(f"{self.state_path}: unreadable study state ({e}); delete it to run every stage "
                            f"again") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "stages" not in state:
            raise SDDMError(f"{self.state_path}: not a study state file of this version; delete it to run "
                            f"every stage again")
        return state

    def _save(self) -> None:
        write_json(self.state, self.state_path)

    def record(self, name: str) -> Optional[Dict[str, Any]]:
        """The state record of stage ``name`` (None if it never ran)."""
        return self.state["stages"].get(name)

    def is_enabled(self, name: str, ctx: Any) -> bool:
        """True if stage ``name`` is part of this study (``Stage.enabled``)."""
        stage = self.stages[self.names.index(name)]
        return stage.enabled is None or bool(stage.enabled(ctx))

    def stage_fingerprint(self, stage: Stage, ctx: Any) -> str:
        """sha256 of the stage's inputs and of each upstream stage's (fingerprint, outputs digest):
        the digest alone is a constant for an upstream stage without output files. Upstream stages
        that are not part of the study are left out, so that a stage gaining an optional upstream
        keeps its fingerprint while that upstream is off."""
        upstream = {u: [(self.record(u) or {}).get(k) for k in ("fingerprint", "outputs_digest")]
                    for u in stage.after if self.is_enabled(u, ctx)}
        return fingerprint({"stage": stage.name, "inputs": stage.inputs(ctx), "upstream": upstream})

    def is_current(self, stage: Stage, ctx: Any) -> bool:
        """True if ``stage`` is done, unchanged and its outputs are intact."""
        rec = self.record(stage.name)
        if not rec or rec.get("status") != "done":
            return False
        if rec.get("fingerprint") != self.stage_fingerprint(stage, ctx):
            return False
        return digest_paths(stage.outputs(ctx), getattr(ctx, "out", None)) == rec.get("outputs_digest")

    def run(self, ctx: Any, from_stage: Optional[str] = None, until: Optional[str] = None) -> Dict[str, Any]:
        """Run (or skip) every stage in order; returns ``{stage: result}``. ``from_stage``
        forces that stage and all later ones to run afresh; ``until`` stops after that stage."""
        for name in (from_stage, until):
            if name is not None and name not in self.names:
                raise SDDMError(f"unknown stage {name!r}; stages: {', '.join(self.names)}")
        forced = False
        results: Dict[str, Any] = {}
        for stage in self.stages:
            forced = forced or stage.name == from_stage
            if not self.is_enabled(stage.name, ctx):
                self._switch_off(stage, ctx)
            elif not forced and self.is_current(stage, ctx):
                rec = self.record(stage.name)
                self.log(f"[study] {stage.name}: done, unchanged (took {rec.get('seconds', 0):.1f} s) - skipped")
                results[stage.name] = rec.get("result", {})
            else:
                results[stage.name] = self._run_one(stage, ctx, forced)
            if stage.name == until:
                break
        return results

    def _switch_off(self, stage: Stage, ctx: Any) -> None:
        """A stage that is not part of the study: nothing runs and nothing is recorded; outputs of
        an earlier run (it was part of the study then) are removed with its record."""
        if self.record(stage.name) is None:
            self.log(f"[study] {stage.name}: not part of this study")
            return
        (stage.clean or (lambda c: remove_paths(stage.outputs(c))))(ctx)
        del self.state["stages"][stage.name]
        self._save()
        self.log(f"[study] {stage.name}: not part of this study any more - its old outputs were removed")

    def _run_one(self, stage: Stage, ctx: Any, forced: bool) -> Dict[str, Any]:
        fp = self.stage_fingerprint(stage, ctx)
        rec = self.record(stage.name) or {}
        resume = (not forced and rec.get("status") == "running" and rec.get("fingerprint") == fp)
        if not resume:
            (stage.clean or (lambda c: remove_paths(stage.outputs(c))))(ctx)
        earlier = float(rec.get("seconds", 0.0)) if resume else 0.0
        why = "resuming an interrupted run" if resume else ("forced (--from)" if forced else
                                                             "changed" if rec else "new")
        self.log(f"[study] {stage.name}: {stage.description} ({why})")
        self.state["stages"][stage.name] = {"status": "running", "fingerprint": fp, "started": _now(),
                                            "seconds": earlier}
        self._save()
        if self.on_stage_start is not None:
            self.on_stage_start(stage.name)
        t0, c0 = time.perf_counter(), cpu_seconds()
        try:
            result = stage.run(ctx, resume) or {}
        finally:
            self.state["stages"][stage.name]["seconds"] = earlier + time.perf_counter() - t0
            self._save()
        seconds = earlier + time.perf_counter() - t0
        cpu = float(rec.get("cpu_seconds", 0.0) if resume else 0.0) + cpu_seconds() - c0
        digest = digest_paths(stage.outputs(ctx), getattr(ctx, "out", None))
        if digest is None:
            missing = [str(p) for p in stage.outputs(ctx) if not Path(p).exists()]
            raise SDDMError(f"stage {stage.name} finished without writing {', '.join(missing)}")
        self.state["stages"][stage.name] = {"status": "done", "fingerprint": fp, "outputs_digest": digest,
                                            "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                                            "started":
                                            self.state["stages"][stage.name]["started"],
                                            "finished": _now(), "result": result}
        self._save()
        self.log(f"[study] {stage.name}: finished in {seconds:.1f} s (CPU {cpu:.1f} s)")
        return result

    def times(self) -> Dict[str, Optional[float]]:
        """Wall time in seconds of every stage (None if it never finished)."""
        out = {}
        for s in self.stages:
            rec = self.record(s.name) or {}
            out[s.name] = rec.get("seconds") if rec.get("status") == "done" else None
        return out
