"""``nnUNetv2_sddm_synthesize --mode labels``: images sampled from label maps by a mask-conditioned
micro model (nnU-Net integrity, labels as-is / deformed / from a folder, geometry, seeds, the mask's
effect, resume, two ranks, refusals), on 32 px phantoms."""
from __future__ import annotations

import json
import threading

import nibabel as nib
import numpy as np
import pytest

from _datasets_fixtures import set_corner_voxel
from _interrupt import interrupt_after_writes
from _micro_model import micro_model_folder, one_torch_thread

from nnunet_sddm.adaptation.synthesize_labels import LabelSampler, synthesize_from_labels
from nnunet_sddm.data.deformation import Deformation, DeformationSettings
from nnunet_sddm.utilities.errors import SDDMError

COND = {"model.condition": "labels", "model.label_values": [1, 2, 3]}
FAST = dict(steps=2, device="cpu", progress=False, batch_size=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    with one_torch_thread():
        root = tmp_path_factory.mktemp("micro")
        yield {"cond": micro_model_folder(root / "c", randomise_output=True, overrides=COND),
               "plain": micro_model_folder(root / "u")}


@pytest.fixture
def phantoms(nnunet_env):
    from nnunet_sddm.data.phantoms import generate_phantom_dataset

    return generate_phantom_dataset(51, "A", 2, matrix=32)


def _data(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_labels_as_is(nnunet_env, phantoms, models):
    from nnunet_sddm.cli.adaptation import synthesize_main
    from nnunet_sddm.data.volumes import same_geometry
    from nnunet_sddm.utilities.nnunet_paths import preprocessed_root, raw_root
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    with one_torch_thread():
        synthesize_main(["-d", "51", "-o", "52", "-m", str(models["cond"]), "--mode", "labels", "--steps", "2",
                         "--copies", "2", "--batch-size", "4", "-device", "cpu", "--quiet"])
    new = raw_root() / "Dataset052_PhantomASDDMGen"
    verify_dataset_integrity(str(new), 1)
    assert not list(raw_root().glob(".*")), "staging folder left behind"
    dj = json.loads((new / "dataset.json").read_text())
    assert dj["numTraining"] == 8 and dj["labels"] == json.loads((phantoms / "dataset.json").read_text())["labels"]
    assert dj["sddm_synthesis"]["mode"] == "labels" and dj["sddm_synthesis"]["guidance_scale"] == 1.0
    records = {r["case"]: r for r in json.loads((new / "cases.json").read_text())}
    assert len(records) == 8
    r = records["PhA0001_ES_gen1"]
    assert (r["source_case"], r["subject"], r["copy"], r["seed"], r["labels"], r["generated"], r["synthetic"],
            r["deformation"], r["domain"], r["guidance_scale"], r["steps"]) == \
        ("PhA0001_ES", "PhA0001", 1, 1, "as-is", True, True, None, None, 1.0, 2)
    assert r["model"] == str(models["cond"].resolve()) and r["vendor"] == "A"  # the source record's fields kept
    for case, rec in records.items():  # labels: byte copies; images: float32, the label map's geometry
        src_lab = phantoms / "labelsTr" / f"{rec['source_case']}.nii.gz"
        assert (new / "labelsTr" / f"{case}.nii.gz").read_bytes() == src_lab.read_bytes()
        img = new / "imagesTr" / f"{case}_0000.nii.gz"
        src_img = phantoms / "imagesTr" / f"{rec['source_case']}_0000.nii.gz"
        assert same_geometry(src_lab, img) and same_geometry(src_img, img)
        x = _data(img)
        assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0
    # different copies -> different images; the same seed -> the same images (copy 0 of seed 1 == copy 1 of seed 0)
    a, b = (_data(new / "imagesTr" / f"PhA0000_ED_gen{k}_0000.nii.gz") for k in (0, 1))
    assert np.abs(a - b).max() > 1e-3
    with one_torch_thread():
        again = synthesize_from_labels(51, 53, str(models["cond"]), seed=1, **FAST)
    np.testing.assert_array_equal(_data(again / "imagesTr" / "PhA0000_ED_gen0_0000.nii.gz"), b)
    # the source's patient-level splits, mapped to the new cases
    src_splits = json.loads((preprocessed_root() / phantoms.name / "splits_final.json").read_text())
    splits = json.loads((preprocessed_root() / new.name / "splits_final.json").read_text())
    for s_new, s_src in zip(splits, src_splits):
        assert s_new["val"] == sorted(f"{c}_gen{k}" for c in s_src["val"] for k in (0, 1))


def test_changing_the_mask_changes_the_output(models):
    """Per-slice streams: changing slice 1 of the map changes slice 1 only; the same map, the same bits."""
    with one_torch_thread():
        sampler = LabelSampler.open(str(models["cond"]), steps=3, device="cpu", batch_size=2, progress=False)
        lab = np.zeros((2, 20, 24), np.float32)
        lab[:, 5:14, 6:15], lab[:, 8:11, 9:12] = 2, 1
        other = lab.copy()
        other[1, 2:18, 2:20] = 3
        run = lambda m: dict(sampler.iter_generated([("x", m, (10.0, 1.5, 1.5))], seed=0))["x"]  # noqa: E731
        a, a2, b = run(lab), run(lab), run(other)
    assert a.shape == (2, 20, 24) and a.dtype == np.float32
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(a[0], b[0])
    assert np.abs(a[1] - b[1]).max() > 1e-3


def test_spacing_mode_keeps_the_map_grid(tmp_path):
    """A model with data.spacing: the map is resampled to the working spacing and the samples back."""
    with one_torch_thread():
        folder = micro_model_folder(tmp_path / "s", randomise_output=True, overrides={**COND, "data.spacing": 2.0})
        sampler = LabelSampler.open(str(folder), steps=2, device="cpu", batch_size=2, progress=False)
        lab = np.zeros((3, 20, 26), np.float32)
        lab[:, 4:15, 5:18], lab[:, 7:12, 8:14] = 2, 1
        out = dict(sampler.iter_generated([("s", lab, (8.0, 1.5, 1.5))], seed=0))["s"]
        assert out.shape == (3, 20, 26) and np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0
        with pytest.raises(SDDMError, match="spacing"):
            dict(sampler.iter_generated([("s", lab, (8.0, 0.0, 1.5))], seed=0))


def test_labels_deformed(nnunet_env, phantoms, models):
    from nnunet_sddm.data.volumes import same_geometry

    with one_torch_thread():
        new = synthesize_from_labels(51, 54, str(models["cond"]), labels="deformed", copies=2, **FAST)
    records = {r["case"]: r for r in json.loads((new / "cases.json").read_text())}
    changed = 0
    for case, rec in records.items():
        src = phantoms / "labelsTr" / f"{rec['source_case']}.nii.gz"
        out = new / "labelsTr" / f"{case}.nii.gz"
        assert same_geometry(src, out) and same_geometry(src, new / "imagesTr" / f"{case}_0000.nii.gz")
        before, after = _data(src), _data(out)
        assert set(np.unique(after)) == set(np.unique(before))  # every structure kept, no new value
        # the recorded draw reproduces the written map (nibabel's (x, y, z) -> (z, y, x))
        d = Deformation.from_dict(rec["deformation"]["deformation"])
        np.testing.assert_array_equal(d.warp_label(before.transpose(2, 1, 0)), after.transpose(2, 1, 0))
        assert rec["labels"] == "deformed" and rec["deformation"]["tries"] >= 1
        changed += not np.array_equal(before, after)
    assert changed == len(records)
    assert records["PhA0000_ED_gen0"]["deformation"] != records["PhA0000_ED_gen1"]["deformation"]
    dj = json.loads((new / "dataset.json").read_text())
    assert dj["sddm_synthesis"]["deformation"]["max_tries"] == DeformationSettings().max_tries


def test_labels_from_a_folder(nnunet_env, phantoms, models, tmp_path):
    from nnunet_sddm.data.volumes import same_geometry
    from nnunet_sddm.utilities.nnunet_paths import preprocessed_root
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = tmp_path / "maps"
    folder.mkdir()
    src = nib.load(str(phantoms / "labelsTr" / "PhA0000_ED.nii.gz"))
    for i, z in enumerate((3, 4, 5)):  # 2D maps stored as (x, y, 1) volumes, other spacing
        arr = np.asarray(src.dataobj)[:, :, z:z + 1]
        nib.save(nib.Nifti1Image(arr, np.diag([1.2, 1.2, 8.0, 1.0])), str(folder / f"map{i}.nii.gz"))
    (folder / "cases.json").write_text(json.dumps([{"case": f"map{i}", "subject": f"gen{i % 2}"} for i in range(3)]))
    with one_torch_thread():
        new = synthesize_from_labels(51, 55, str(models["cond"]), labels_from=folder, **FAST)
    verify_dataset_integrity(str(new), 1)
    records = {r["case"]: r for r in json.loads((new / "cases.json").read_text())}
    assert sorted(records) == ["map0_gen0", "map1_gen0", "map2_gen0"]
    r = records["map1_gen0"]
    assert (r["source_case"], r["subject"], r["label_map"], r["label_record"]["subject"]) == \
        (None, "gen1", "map1", "gen1")
    for i in range(3):
        lab = new / "labelsTr" / f"map{i}_gen0.nii.gz"
        assert lab.read_bytes() == (folder / f"map{i}.nii.gz").read_bytes()
        assert same_geometry(folder / f"map{i}.nii.gz", new / "imagesTr" / f"map{i}_gen0_0000.nii.gz")
    splits = json.loads((preprocessed_root() / new.name / "splits_final.json").read_text())
    assert len(splits) == 2 and sorted(splits[0]["val"] + splits[1]["val"]) == sorted(records)


def test_labels_from_a_label_map_generators_output(nnunet_env, phantoms, models, tmp_path):
    """``nnUNetv2_sddm_generate_labels``' OUT (labelsTr/ and its own cases.json record) is taken as it is."""
    out = tmp_path / "generated_maps"
    (out / "labelsTr").mkdir(parents=True)
    src = nib.load(str(phantoms / "labelsTr" / "PhA0000_ED.nii.gz"))
    for i, z in enumerate((3, 5)):
        arr = np.asarray(src.dataobj)[:, :, z:z + 1]
        nib.save(nib.Nifti1Image(arr, np.diag([1.2, 1.2, 8.0, 1.0])), str(out / "labelsTr" / f"gen_{i:04d}.nii.gz"))
    (out / "cases.json").write_text(json.dumps({"seed": 3, "n": 2, "cases": [
        {"case": f"gen_{i:04d}", "file": f"labelsTr/gen_{i:04d}.nii.gz", "batch": 0, "draws": 1 + i} for i in range(2)]}))
    with one_torch_thread():
        new = synthesize_from_labels(51, 57, str(models["cond"]), labels_from=out, **FAST)
    records = {r["case"]: r for r in json.loads((new / "cases.json").read_text())}
    assert sorted(records) == ["gen_0000_gen0", "gen_0001_gen0"]
    assert records["gen_0001_gen0"]["label_record"]["draws"] == 2
    (out / "cases.json").write_text(json.dumps({"cases": [{"file": "x"}]}))
    with pytest.raises(SDDMError, match="cases.json: expected the generator's 'cases' to be records"):
        synthesize_from_labels(51, 58, str(models["cond"]), labels_from=out, **FAST)


def test_resume_keeps_finished_cases(nnunet_env, phantoms, models, monkeypatch):
    import nnunet_sddm.adaptation.pipeline as pipeline
    from nnunet_sddm.data.volumes import write_like
    from nnunet_sddm.utilities.nnunet_paths import raw_root

    interrupt_after_writes(monkeypatch, 2)
    with one_torch_thread(), pytest.raises(KeyboardInterrupt):
        synthesize_from_labels(51, 56, str(models["cond"]), labels="deformed", **{**FAST, "batch_size": 2})
    partial = raw_root() / ".Dataset056_PhantomASDDMGen.partial"
    assert partial.is_dir() and not (raw_root() / "Dataset056_PhantomASDDMGen").exists()
    first = {p.name: p.stat().st_mtime_ns for p in (partial / "imagesTr").iterdir()}
    labels = {p.name: p.read_bytes() for p in (partial / "labelsTr").iterdir()}
    assert len(first) == 2 and len(labels) == 4
    (partial / "imagesTr" / ".PhA0001_ED_gen0_0000.x1y2z3_4.nii.gz").write_bytes(b"half")  # a killed write
    monkeypatch.setattr(pipeline, "write_like", write_like)
    with one_torch_thread():
        out = synthesize_from_labels(51, 56, str(models["cond"]), labels="deformed", **{**FAST, "batch_size": 2})
    assert {n: (out / "imagesTr" / n).stat().st_mtime_ns for n in first} == first  # kept, not redone
    assert {p.name: p.read_bytes() for p in (out / "labelsTr").iterdir()} == labels
    assert len(list((out / "imagesTr").iterdir())) == 4 and not partial.exists()
    assert not [p for p in out.rglob(".*")], "stale temp files published into the dataset"
    # an unfinished run of other settings is not continued
    interrupt_after_writes(monkeypatch, 1)
    with one_torch_thread(), pytest.raises(KeyboardInterrupt):
        synthesize_from_labels(51, 57, str(models["cond"]), **FAST)
    monkeypatch.setattr(pipeline, "write_like", write_like)
    with one_torch_thread():
        out = synthesize_from_labels(51, 57, str(models["cond"]), guidance_scale=2.0, **FAST)
    assert json.loads((out / "cases.json").read_text())[0]["guidance_scale"] == 2.0


def test_two_ranks_split_the_work_and_equal_one(nnunet_env, phantoms, models, monkeypatch):
    """Two ranks as threads (the collectives replaced by a thread barrier): each samples its share,
    and the published dataset equals the single-process one byte for byte."""
    import nnunet_sddm.adaptation.pipeline as pipeline
    from nnunet_sddm.utilities import distributed as dist_utils

    with one_torch_thread():
        single = synthesize_from_labels(51, 58, str(models["cond"]), labels="deformed", **FAST)
    gate, flags, real_write, written = threading.Barrier(2), {}, pipeline.write_like, {0: [], 1: []}

    def barrier(ranks):
        if ranks.distributed:
            gate.wait(timeout=60)

    def all_ok(ok, message, ranks):
        flags[ranks.rank] = (ok, message)
        barrier(ranks)
        bad = [m for good, m in flags.values() if not good]
        barrier(ranks)
        if bad:
            raise SDDMError(bad[0])

    def write(data, template, path):
        written[int(threading.current_thread().name)].append(path.name)
        return real_write(data, template, path)

    monkeypatch.setattr(dist_utils, "barrier", barrier)
    monkeypatch.setattr(dist_utils, "all_ok", all_ok)
    monkeypatch.setattr(pipeline, "write_like", write)
    errors = []

    def rank(r):
        try:
            synthesize_from_labels(51, 59, str(models["cond"]), labels="deformed", ranks=dist_utils.Ranks(r, 2, r),
                                   **FAST)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            gate.abort()

    with one_torch_thread():
        threads = [threading.Thread(target=rank, args=(r,), name=str(r)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    assert len(written[0]) == len(written[1]) == 2 and not set(written[0]) & set(written[1])
    out = single.parent / "Dataset059_PhantomASDDMGen"
    files = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file() and p.name.endswith(".nii.gz"))
    assert len(files) == 8
    for f in files:
        assert (single / f).read_bytes() == (out / f).read_bytes(), f
    strip = lambda p: [{k: v for k, v in r.items() if k != "dataset"} for r in json.loads(p.read_text())]  # noqa: E731
    assert strip(single / "cases.json") == strip(out / "cases.json")


def test_bad_inputs(nnunet_env, phantoms, models, capsys, tmp_path):
    from nnunet_sddm.adaptation.synthesize import synthesize_dataset
    from nnunet_sddm.cli.adaptation import synthesize_main
    from nnunet_sddm.sampling.guided import SamplerSettings
    from nnunet_sddm.utilities.nnunet_paths import raw_root

    cond, plain = str(models["cond"]), str(models["plain"])
    with pytest.raises(SDDMError, match="unconditional.*--mode labels"):
        synthesize_from_labels(51, 60, plain, **FAST)
    with pytest.raises(SDDMError, match="mask-conditioned"):
        synthesize_dataset(51, 60, cond, SamplerSettings(N=1, steps=3), device="cpu", progress=False)
    with pytest.raises(SDDMError, match="--domain target.*no domains"):
        synthesize_from_labels(51, 60, cond, domain="target", **FAST)
    with pytest.raises(SDDMError, match="guidance scale"):
        synthesize_from_labels(51, 60, cond, guidance_scale=-1.0, **FAST)
    no_dropout = micro_model_folder(tmp_path / "c0", overrides={**COND, "training.label_dropout": 0.0})
    with pytest.raises(SDDMError, match="--guidance-scale 2.0: .*without label dropout"):
        synthesize_from_labels(51, 60, str(no_dropout), guidance_scale=2.0, **FAST)
    for argv, match in ((["--mode", "labels", "-N", "3"], "--mode labels does not use -N"),
                        (["--labels", "deformed"], "--mode restyle does not use --labels")):
        with pytest.raises(SystemExit) as e:
            synthesize_main(["-d", "51", "-o", "60", "-m", cond, "--quiet", *argv])
        assert e.value.code == 2 and match in capsys.readouterr().err
    # a deformation that destroys a structure on every try: the case is named, nothing published
    crush = DeformationSettings(scale=(0.05, 0.06), max_tries=2)
    with pytest.raises(SDDMError, match="case PhA0000_ED.*all 2 deformations"):
        synthesize_from_labels(51, 60, cond, labels="deformed", deformation=crush, **FAST)
    assert not (raw_root() / "Dataset060_PhantomASDDMGen").exists()
    # a label value the model was not trained on: the case is named, before anything is written
    path = phantoms / "labelsTr" / "PhA0001_ES.nii.gz"
    set_corner_voxel(path, 7)
    with pytest.raises(SDDMError, match=r"case PhA0001_ES.*\[7\].*not among the model's labels"):
        synthesize_from_labels(51, 61, cond, **FAST)
    assert not list(raw_root().glob("*061*")) and not list(raw_root().glob(".*061*"))
