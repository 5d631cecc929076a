"""The run record of folder adaptation: a failed run never blocks its retry, resume trusts only
the outputs the record lists (name and digest), files in the way are refused, progress bars in logs."""
from __future__ import annotations

import io
import json

import nibabel as nib
import numpy as np
import pytest

from _micro_model import micro_model_folder, one_torch_thread
from test_adaptation_volumes import FAST, make_input_folder

from nnunet_sddm.adaptation.folders import RECORD_FILE, adapt_folder
from nnunet_sddm.adaptation.record import RunRecord, sha256_file
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.progress import progress_bar


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    with one_torch_thread():
        yield micro_model_folder(tmp_path_factory.mktemp("micro"), randomise_output=True)


def test_failed_run_leaves_nothing_that_blocks_the_retry(tmp_path, model_dir):
    """An unreadable image: refused by name, no record written; the retry without it runs."""
    src = make_input_folder(tmp_path / "in")
    (src / "broken_0000.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    with pytest.raises(SDDMError, match="broken_0000"):
        adapt_folder(src, out, str(model_dir), FAST, device="cpu", progress=False)
    assert not (out / RECORD_FILE).exists()
    (src / "broken_0000.nii.gz").unlink()
    written = adapt_folder(src, out, str(model_dir), FAST, device="cpu", progress=False)
    assert len(written) == 3


def test_record_without_finished_outputs_protects_nothing(tmp_path, model_dir):
    """A record of another run that finished no output (e.g. left by an older version) is replaced."""
    src = make_input_folder(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / RECORD_FILE).write_text(json.dumps({"model": "/elsewhere", "cases": ["other"]}))
    assert len(adapt_folder(src, out, str(model_dir), FAST, device="cpu", progress=False)) == 3
    rec = json.loads((out / RECORD_FILE).read_text())
    assert sorted(rec["finished"]) == sorted(p.name for p in src.iterdir())


def test_file_in_the_way_is_refused_not_taken_for_a_result(tmp_path, model_dir):
    """OUT already holds an unadapted copy of an input: no record says it was adapted, so the run
    refuses it by name (nothing written); --overwrite replaces it with the adapted image."""
    src = make_input_folder(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    raw = (src / "thin_0000.nii.gz").read_bytes()
    (out / "thin_0000.nii.gz").write_bytes(raw)
    with pytest.raises(SDDMError, match="thin_0000.nii.gz.*in the way"):
        adapt_folder(src, out, str(model_dir), FAST, device="cpu", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["thin_0000.nii.gz"], "a refused run writes nothing"
    written = adapt_folder(src, out, str(model_dir), FAST, device="cpu", overwrite=True, progress=False)
    assert len(written) == 3 and (out / "thin_0000.nii.gz").read_bytes() != raw


def test_resume_redoes_an_output_whose_digest_does_not_match(tmp_path, model_dir):
    src = make_input_folder(tmp_path / "in")
    out = tmp_path / "out"
    adapt_folder(src, out, str(model_dir), FAST, device="cpu", progress=False)
    good = nib.load(str(out / "aniso_0000.nii.gz")).get_fdata()
    (out / "aniso_0000.nii.gz").write_bytes((src / "aniso_0000.nii.gz").read_bytes())  # replaced behind our back
    again = adapt_folder(src, out, str(model_dir), FAST, device="cpu", progress=False)
    assert [p.name for p in again] == ["aniso_0000.nii.gz"]
    np.testing.assert_array_equal(nib.load(str(out / "aniso_0000.nii.gz")).get_fdata(), good)
    assert adapt_folder(src, out, str(model_dir), FAST, device="cpu", progress=False) == []


def test_run_record_lists_digests_and_merges_ranks(tmp_path):
    from nnunet_sddm.utilities.distributed import Ranks

    out = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    main = RunRecord(tmp_path / "rec.json", {"model": "m"}, ("model",), Ranks(0, 2, 0))
    main.open(out)
    other = RunRecord(tmp_path / "rec.json", {"model": "m"}, ("model",), Ranks(1, 2, 1))
    other.load()
    out[0].write_bytes(b"zero")
    out[1].write_bytes(b"one")
    main.mark_finished(out[0])
    other.mark_finished(out[1])
    assert not main.is_finished(out[1]) and other.is_finished(out[1])
    main.merge_ranks()
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["finished"] == {"a.nii.gz": sha256_file(out[0]), "b.nii.gz": sha256_file(out[1])}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nii.gz", "rec.json"]


def test_progress_in_a_log_is_plain_lines():
    """Not a terminal: whole lines, no carriage returns (tqdm's redraws made megabytes of logs)."""
    log = io.StringIO()
    bar = progress_bar(total=500, desc="adapting", unit="slice", file=log, mininterval=0, maxinterval=0)
    for _ in range(500):
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    assert "500/500" in text.splitlines()[-1]
    quiet = io.StringIO()
    for _ in progress_bar(range(10_000), desc="x", file=quiet):  # default interval: 30 s
        pass
    assert "\r" not in quiet.getvalue() and len(quiet.getvalue().splitlines()) <= 3


def test_adapt_folder_progress_to_a_log_has_no_carriage_returns(tmp_path, model_dir, capsys):
    src = make_input_folder(tmp_path / "in")
    adapt_folder(src, tmp_path / "out", str(model_dir), FAST, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "adapting" in err and "\r" not in err


def test_progress_in_a_log_ignores_forced_refreshes():
    """set_postfix refreshes the bar; in a log that must not add lines between the intervals."""
    log = io.StringIO()
    bar = progress_bar(total=100, desc="training", file=log)  # default interval: 30 s
    for i in range(100):
        bar.set_postfix(loss=1.0 / (i + 1))
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) <= 3 and "100/100" in lines[-1]
