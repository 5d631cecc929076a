"""Every command's --help, and every message and docstring of the package: no citation of files a
user does not have (developer notes), no unformatted '%%', no stale run-time claims."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from nnunet_sddm.cli.launch import SCRIPTS, target

ROOT = Path(__file__).resolve().parents[1]
DEVELOPER_NOTES = re.compile(r"SDDM_METHOD\.md|NNUNET_INTEGRATION\.md|PEERS\.md")


def help_text(script: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        target(script)(["--help"])
    assert e.value.code == 0, script
    return out.getvalue()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_text(script):
    text = help_text(script)
    assert script in text or "usage" in text
    assert not DEVELOPER_NOTES.search(text), f"{script} --help cites a developer note"
    assert "%%" not in text, f"{script} --help shows an unformatted '%%'"


def test_quick_help_states_the_measured_time():
    """The help, the README and the study guide give the same time for --quick, the measured one
    (18 min on a 2-core EPYC, docs/benchmarks.md), and none repeats an older figure."""
    text = " ".join(help_text("nnUNetv2_sddm_study").split())
    assert "under 20 minutes on a 2-core CPU" in text and "vendor B" in text
    for doc in (ROOT / "README.md", ROOT / "docs" / "how_to" / "study.md", ROOT / "docs" / "getting_started.md"):
        flat = " ".join(doc.read_text().split())
        assert "under 20 minutes on a 2-core CPU" in flat, doc
        for old in ("about an hour or more", "15 to 30 minutes", "about 30 minutes", "vendor D"):
            assert old not in flat, (doc, old)


def test_no_source_file_cites_developer_notes():
    """Help texts, messages and docstrings point into docs/, never to notes users do not have."""
    offenders = [str(p.relative_to(ROOT)) for folder in ("nnunet_sddm", "plugin_trainers", "dataset_converters",
                                                         "benchmarks")
                 for p in (ROOT / folder).rglob("*.py") if DEVELOPER_NOTES.search(p.read_text())]
    assert not offenders, offenders


def test_docs_links_resolve():
    """Every relative link of README.md and docs/ names a file that exists."""
    broken = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in link or link.startswith("mailto:"):
                continue
            if not (md.parent / link).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {link}")
    assert not broken, broken
