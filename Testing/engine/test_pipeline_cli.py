"""The command line end to end: real CT volumes, outputs, batch failures, overwrite protection, cancel."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib.cli import main
from COVIDLesionSegLib.errors import InputError
from COVIDLesionSegLib.evaluation import evaluate_slice_labels, read_slice_labels, roc_auc, slice_agreement
from COVIDLesionSegLib.outputs import ResultsHeaderMismatchError
from COVIDLesionSegLib.phantom import make_chest_phantom
from COVIDLesionSegLib.pipeline import Pipeline, SegmentOptions
from COVIDLesionSegLib.progress import Cancelled
from COVIDLesionSegLib.volume import CTVolume, Geometry
from Testing.conftest import shared_file

from .conftest import CUT_CASE, DICOM_CASE, REAL_CASES


@pytest.fixture(scope="module")
def real_run(real_batch):
    """The CLI batch over the real volumes (``conftest.real_batch``, shared with the DICOM and report tests)."""
    status, out, _root = real_batch
    return status, out


def _body_mask(hu: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    body = hu > -500
    labels, n = ndimage.label(body)
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return np.stack([ndimage.binary_fill_holes(s) for s in labels == largest])


@pytest.mark.parametrize("name", REAL_CASES)
def test_real_ct_lungs_are_plausible(real_run, name):
    status, out = real_run
    assert status == 0
    report = json.loads((out / f"{name}.json").read_text())
    q = report["quantification"]
    right, left = q["right_lung"]["volume_ml"], q["left_lung"]["volume_ml"]
    assert 800 <= right <= 4500 and 800 <= left <= 4500, (right, left)

    ct = sitk.ReadImage(str(shared_file(f"ct/{name}.nii.gz")))
    labels_img = sitk.ReadImage(str(out / f"{name}_labels.nii.gz"))
    assert Geometry.of(labels_img) == Geometry.of(ct)          # exact input geometry
    labels = sitk.GetArrayFromImage(labels_img)
    hu = sitk.GetArrayFromImage(ct)
    lungs = labels > 0
    assert np.all(_body_mask(hu)[lungs])                       # nothing outside the body
    # right lung on the patient's right: smaller x in these LPS files
    xs_right = np.nonzero(labels == 1)[2].mean()
    xs_left = np.nonzero(labels == 2)[2].mean()
    assert xs_right < xs_left
    # the two lungs are separate: no right-lung voxel touches a left-lung voxel along x
    touching = np.count_nonzero((labels[:, :, :-1] == 1) & (labels[:, :, 1:] == 2))
    assert touching < 0.001 * np.count_nonzero(lungs)
    for key in ("upper", "middle", "lower", "ventral", "dorsal"):
        assert key in json.dumps(q["right_lung"]["zones"])
    assert set(report["timings_s"]) >= {"read", "check", "lungs", "infection", "quantify", "write"}


def test_lidc_nodule_inside_lung_mask(real_run):
    _, out = real_run
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lidc_0001_ct_labels.nii.gz")))
    nodule = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_file("ct/lidc_0001_nodules.nii.gz")))) > 0
    inside = np.count_nonzero(nodule & (labels > 0)) / np.count_nonzero(nodule)
    assert inside >= 0.95, inside


def test_p001_infected_slices_inside_lung_extent(real_run):
    _, out = real_run
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "covidctmd_p001_ct_labels.nii.gz")))
    z_with_lung = np.nonzero((labels > 0).any(axis=(1, 2)))[0]
    labels_p001 = read_slice_labels(shared_file("ct/covidctmd_slice_labels.csv"), "covidctmd_p001_ct.nii.gz")
    infected_z = labels_p001["z"][labels_p001["infected"]].tolist()
    assert len(infected_z) == 80
    assert z_with_lung.min() <= min(infected_z) and max(infected_z) <= z_with_lung.max()


def test_results_csv_has_one_row_per_case(real_run):
    _, out = real_run
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["case"] for r in rows] == REAL_CASES + [CUT_CASE, DICOM_CASE]
    assert all(r["status"] == "ok" for r in rows)


def test_a_scan_cut_at_the_lung_bases_gets_the_coverage_warning(real_run):
    """normal001 covers its lungs; the same scan without its lowest 80 mm does not, and says so."""
    _, out = real_run
    whole = json.loads((out / "covidctmd_normal001_ct.json").read_text())
    cut = json.loads((out / f"{CUT_CASE}.json").read_text())
    assert "lungs_cut_by_scan_range" not in [w["code"] for w in whole["warnings"]]
    (warning,) = [w for w in cut["warnings"] if w["code"] == "lungs_cut_by_scan_range"]
    assert "the lowest slice (the lung bases)" in warning["message"]
    assert warning["message"] in cut["notes"]
    row = {r["case"]: r for r in csv.DictReader((out / "results.csv").open())}[CUT_CASE]
    assert "lungs_cut_by_scan_range" in row["warnings"].split()
    assert cut["quantification"]["both_lungs"]["volume_ml"] < whole["quantification"]["both_lungs"]["volume_ml"]
    assert "does not cover the whole lungs" in (out / f"{CUT_CASE}_report.html").read_text(encoding="utf-8")


def test_p001_json_holds_the_severity_measures(real_run):
    _, out = real_run
    q = json.loads((out / "covidctmd_p001_ct.json").read_text())["quantification"]
    severity = q["severity"]
    for key in ("right_lung", "left_lung", "both_lungs"):
        assert severity["percentage_of_opacity"][key] == q[key]["infected_percent"] > 0
        assert 0 < severity["percentage_of_high_opacity"][key] <= severity["percentage_of_opacity"][key]
    assert 0 < severity["zone_score"] <= severity["zone_score_max"] == 24
    assert severity["zone_score"] == sum(severity["zone_scores"].values())
    row = {r["case"]: r for r in csv.DictReader((out / "results.csv").open())}["covidctmd_p001_ct"]
    assert float(row["both_po_pct"]) == severity["percentage_of_opacity"]["both_lungs"]
    assert float(row["both_pho_pct"]) == severity["percentage_of_high_opacity"]["both_lungs"]
    assert int(row["zone_score"]) == severity["zone_score"]


def test_every_case_has_its_reports_and_the_batch_its_summary(real_run):
    _, out = real_run
    cases = REAL_CASES + [CUT_CASE, DICOM_CASE]
    for case in cases:
        assert (out / f"{case}_report.pdf").read_bytes()[:5] == b"%PDF-"
        page = (out / f"{case}_report.html").read_text(encoding="utf-8")
        assert "NOT FOR DIAGNOSTIC USE" in page
    summary = (out / "report.html").read_text(encoding="utf-8")
    assert all(f'<a href="{case}_report.html">{case}</a>' in summary for case in cases)
    assert "5 case(s) segmented, 0 failed" in summary
    # The NIfTI cases could not have DICOM outputs, and their notes say why.
    report = json.loads((out / "lidc_0001_ct.json").read_text())
    assert "dicom_seg" not in report["outputs"]
    assert any(n.startswith("DICOM SEG and SR not written: the input is not a DICOM series") for n in report["notes"])


def _phantom_file(folder: Path, name="phantom", flip_x=False) -> tuple[Path, dict]:
    image, truth = make_chest_phantom()
    if flip_x:
        # Same anatomy stored with the x axis reversed, with the direction that says so.
        arr = sitk.GetArrayFromImage(image)[:, :, ::-1].copy()
        flipped = sitk.GetImageFromArray(arr)
        flipped.SetSpacing(image.GetSpacing())
        direction = np.array(image.GetDirection()).reshape(3, 3)
        direction[:, 0] *= -1
        origin = image.TransformIndexToPhysicalPoint([image.GetSize()[0] - 1, 0, 0])
        flipped.SetDirection(direction.ravel().tolist())
        flipped.SetOrigin(origin)
        image = flipped
    path = folder / f"{name}.nii.gz"
    sitk.WriteImage(image, str(path))
    return path, truth


def test_flipped_storage_gives_same_sides_and_volumes(tmp_path):
    plain, _ = _phantom_file(tmp_path, "plain")
    flipped, _ = _phantom_file(tmp_path, "flipped", flip_x=True)
    assert main(["segment", str(plain), str(flipped), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    a = json.loads((tmp_path / "out" / "plain.json").read_text())["quantification"]
    b = json.loads((tmp_path / "out" / "flipped.json").read_text())["quantification"]
    for side in ("right_lung", "left_lung"):
        assert a[side]["volume_ml"] == pytest.approx(b[side]["volume_ml"], rel=1e-6)
    assert a["right_lung"]["volume_ml"] != pytest.approx(a["left_lung"]["volume_ml"], rel=1e-3)


def test_batch_continues_past_a_failed_case_and_exits_nonzero(tmp_path, capsys):
    good, _ = _phantom_file(tmp_path)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti at all")
    windowed = tmp_path / "windowed.nii.gz"
    arr = np.clip(sitk.GetArrayFromImage(sitk.ReadImage(str(good))) + 1000, 0, 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(windowed))
    out = tmp_path / "out"
    status = main(["segment", str(broken), str(good), str(windowed), "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert status == 1
    assert "broken.nii.gz" in err and "cannot be read" in err
    assert "windowed.nii.gz" in err and "already windowed to 0-255" in err
    assert (out / "phantom.seg.nrrd").is_file() and (out / "phantom_labels.nii.gz").is_file()
    assert not list(out.glob("broken*")) and not list(out.glob("windowed*"))
    rows = list(csv.DictReader((out / "results.csv").open()))
    # Failed cases are in the record too (issue 11, item 9), with their reason.
    assert [(r["case"], r["status"]) for r in rows] == [("broken", "failed"), ("phantom", "ok"), ("windowed", "failed")]
    assert "already windowed" in rows[2]["error"]


def test_existing_outputs_are_not_overwritten_without_flag(tmp_path, capsys):
    ct, _ = _phantom_file(tmp_path)
    out = tmp_path / "out"
    assert main(["segment", str(ct), "-o", str(out), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["segment", str(ct), "-o", str(out), "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["segment", str(ct), "-o", str(out), "--quiet", "--overwrite", "--lungs-only"]) == 0
    report = json.loads((out / "phantom.json").read_text())
    assert "infection" not in report["models"]


def test_an_old_results_table_stops_the_run_before_any_case_is_computed(tmp_path, capsys):
    # A results.csv from a version with other columns: said at once, nothing computed or changed (before,
    # every case ran to its commit and then failed there, its results unwritten).
    ct, _ = _phantom_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("case,status,infection_ml\nold_case,ok,12.5\n")
    before = (out / "results.csv").read_bytes()
    stages = []
    pipeline = Pipeline(SegmentOptions())
    with pytest.raises(ResultsHeaderMismatchError, match="move the old results.csv away"):
        pipeline.segment_file(ct, out, on_progress=lambda stage, fraction, message: stages.append(stage))
    assert stages == []                                       # refused before reading the CT
    assert main(["segment", str(ct), str(ct), "-o", str(out), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "different columns" in err and "infection_ml" in err and err.count("different columns") == 1
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["results.csv"]   # no case files
    assert (out / "results.csv").read_bytes() == before


def test_cancel_writes_nothing(tmp_path):
    ct, _ = _phantom_file(tmp_path)
    pipeline = Pipeline(SegmentOptions())

    def cancel_in_infection(stage, fraction, message):
        if stage == "infection":
            raise Cancelled()

    with pytest.raises(Cancelled):
        pipeline.segment_file(ct, tmp_path / "out", on_progress=cancel_in_infection)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_in_memory_run_matches_phantom_truth(tmp_path):
    image, truth = make_chest_phantom()
    result = Pipeline(SegmentOptions()).run(CTVolume.from_image(image))
    for label, key in ((1, "right_lung"), (2, "left_lung")):
        pred, ref = result.lungs == label, truth[key] > 0
        dsc = 2 * np.count_nonzero(pred & ref) / (pred.sum() + ref.sum())
        assert dsc > 0.9, (key, dsc)
    assert result.infection is not None and result.infection.any()
    assert not np.any(result.infection & (result.lungs == 0))


def test_fast_mode_runs_coarser_and_says_so(tmp_path):
    """``--fast``: a note in the report and the CSV, ``fast`` in the model records, lungs within 5 % DSC of a
    normal run and the phantom's infection still found (docs/default_models.md section 8 measures real scans)."""
    from COVIDLesionSegLib.pipeline import FAST_MODE_NOTE

    ct, truth = _phantom_file(tmp_path)
    assert main(["segment", str(ct), "-o", str(tmp_path / "normal"), "--quiet"]) == 0
    assert main(["segment", str(ct), "-o", str(tmp_path / "fast"), "--fast", "--quiet"]) == 0
    normal = json.loads((tmp_path / "normal" / "phantom.json").read_text())
    fast = json.loads((tmp_path / "fast" / "phantom.json").read_text())
    assert FAST_MODE_NOTE in fast["notes"] and FAST_MODE_NOTE not in normal["notes"]
    assert fast["models"]["lungs"]["fast"] is True and "fast" not in normal["models"]["lungs"]
    row = next(csv.DictReader((tmp_path / "fast" / "results.csv").open()))
    assert "fast mode" in row["notes"]
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "normal" / "phantom_labels.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "fast" / "phantom_labels.nii.gz")))
    for label in (1, 2):   # each lung outside the infection (which takes label 3 in the labelmap)
        lung_a, lung_b = a == label, b == label
        assert 2 * (lung_a & lung_b).sum() / (lung_a.sum() + lung_b.sum()) > 0.95
    infection = truth["infection"] > 0
    assert (b[infection] == 3).mean() > 0.5 * (a[infection] == 3).mean() > 0


def test_evaluate_and_models_list(tmp_path, capsys):
    ct, truth = _phantom_file(tmp_path)
    out = tmp_path / "out"
    assert main(["segment", str(ct), "-o", str(out), "--quiet"]) == 0
    ref = tmp_path / "truth_infection.nii.gz"
    ref_img = sitk.GetImageFromArray(truth["infection"].astype(np.uint8))
    ref_img.CopyInformation(sitk.ReadImage(str(ct)))
    sitk.WriteImage(ref_img, str(ref))
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(out / "phantom.seg.nrrd"), "--ref", str(ref)]) == 0
    result = json.loads(capsys.readouterr().out)
    infection = result["segments"]["COVID-19 infection"]
    assert 0 < infection["dsc"] <= 1 and set(infection) >= {"nsd", "sensitivity", "hd95", "voe", "rvd"}
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "hu-lungs" in listing and "hu-threshold" in listing


def _write_labelmap(path: Path, labels: np.ndarray) -> Path:
    img = sitk.GetImageFromArray(labels.astype(np.uint8))
    img.SetSpacing((0.8, 0.8, 2.0))
    sitk.WriteImage(img, str(path))
    return path


def test_evaluate_against_per_slice_labels(tmp_path, capsys):
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[:, 2:6, 1:4] = 1                     # right lung on every slice
    labels[:, 2:6, 4:7] = 2                     # left lung
    labels[1, 3, 2] = labels[2, 3:5, 2] = labels[4, 3, 5] = 3   # infection on slices 1, 2 (area 2) and 4
    pred = _write_labelmap(tmp_path / "scan7_labels.nii.gz", labels)
    csv_path = tmp_path / "labels.csv"
    truth = [0, 1, 1, 1, 0, 0]                 # slice 3 missed, slice 4 a false positive
    csv_path.write_text("file,z_index,infected,LLL,LUL,RLL,RML,RUL\n" + "".join(
        f"scan7.nii.gz,{z},{t},0,0,{t},0,0\n" for z, t in enumerate(truth)) + "other.nii.gz,0,1,0,0,0,0,0\n")
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(pred), "--slice-labels", str(csv_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["file"] == "scan7" and result["n_slices"] == 6 and result["n_infected_slices"] == 3
    s = result["slice"]
    assert (s["tp"], s["fn"], s["tn"], s["fp"]) == (2, 1, 2, 1)
    assert s["sensitivity"] == pytest.approx(2 / 3, abs=1e-6) and s["specificity"] == pytest.approx(2 / 3, abs=1e-6)
    # AUC ranks the slices by infected area (here 0, 1, 2, 0, 1, 0)
    assert s["auc"] == pytest.approx(roc_auc(np.array([0, 1, 2, 0, 1, 0]), np.array(truth, bool)))
    assert "sides" not in result                # a labelmap with infection hides the sides
    assert result["infected_share_of_lungs"] == pytest.approx(4 / (6 * 4 * 6), abs=1e-6)
    with pytest.raises(InputError, match="no rows for 'missing'"):
        evaluate_slice_labels(pred, csv_path, "missing")
    short = tmp_path / "short.csv"
    short.write_text("file,z_index,infected\nscan7.nii.gz,9,1\n")
    with pytest.raises(InputError, match="does not fit"):
        evaluate_slice_labels(pred, short)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("name,slice\nscan7,0\n")
    with pytest.raises(InputError, match="not a per-slice label file"):
        evaluate_slice_labels(pred, wrong)


def test_roc_auc_and_slice_agreement():
    truth = np.array([1, 1, 0, 0], bool)
    assert roc_auc(np.array([3.0, 2.0, 1.0, 0.0]), truth) == 1.0
    assert roc_auc(np.array([0.0, 1.0, 2.0, 3.0]), truth) == 0.0
    assert roc_auc(np.array([1.0, 1.0, 1.0, 1.0]), truth) == 0.5     # ties count half
    assert np.isnan(roc_auc(np.array([1.0, 2.0]), np.array([1, 1], bool)))
    got = slice_agreement(np.array([5, 0, 0, 2]), truth)
    assert (got["tp"], got["fn"], got["tn"], got["fp"]) == (1, 1, 1, 1)


def test_demo_runs_and_reports_agreement(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "agreement with the phantom's known truth" in out
    assert (tmp_path / "demo" / "synthetic_chest_ct.seg.nrrd").is_file()


def test_segment_with_a_network_model(tmp_path):
    """A shipped learned model runs through the CLI and its device, runtime and arithmetic land in the JSON
    report: PyTorch (bfloat16 on CPUs that have it), or ONNX Runtime (float32) where COVIDLESIONSEG_RUNTIME asks
    for it and it is installed."""
    from COVIDLesionSegLib import catalogue, onnx_runtime
    from COVIDLesionSegLib.network_predictor import cpu_has_native_bfloat16

    networks = [e for e in catalogue.list_models() if e.source == "shipped" and e.available and e.task == "infection"]
    if not networks:
        pytest.skip("no learned infection model is shipped")
    ct, _ = _phantom_file(tmp_path)
    out = tmp_path / "out"
    assert main(["segment", str(ct), "-o", str(out), "--model", networks[0].model_id, "--device", "cpu",
                 "--quiet"]) == 0
    report = json.loads((out / "phantom.json").read_text())
    if onnx_runtime.installed() and onnx_runtime.DEFAULT_RUNTIME in ("auto", "onnxruntime"):
        arithmetic = {"runtime": "onnxruntime", "precision": "float32"}
    else:
        arithmetic = {"runtime": "torch", "precision": "bfloat16" if cpu_has_native_bfloat16() else "float32"}
    assert report["models"]["infection"] == {"id": networks[0].model_id, "version": networks[0].version,
                                             "device": "cpu", "licence": networks[0].licence, **arithmetic}
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "phantom_labels.nii.gz")))
    assert set(np.unique(labels)) <= {0, 1, 2, 3}


def test_contrast_and_metal_warnings_on_the_real_scans(real_run):
    """LIDC-IDRI-0001 is contrast-enhanced (about two thirds of its mediastinal soft tissue at 150-600 HU) and holds
    ~11 mL above 2500 HU; the two COVID-CT-MD scans are unenhanced and free of metal (maxima 1563 and 1679 HU)."""
    _, out = real_run
    codes = {name: [w["code"] for w in json.loads((out / f"{name}.json").read_text())["warnings"]]
             for name in REAL_CASES}
    assert "contrast_enhanced" in codes["lidc_0001_ct"] and "metal" in codes["lidc_0001_ct"]
    for name in ("covidctmd_p001_ct", "covidctmd_normal001_ct"):
        assert "contrast_enhanced" not in codes[name] and "metal" not in codes[name], (name, codes[name])
        assert "implausible_lung_volume" not in codes[name] and "lung_imbalance" not in codes[name]


def test_a_missing_default_model_file_is_said_not_silently_replaced(tmp_path, monkeypatch, capsys):
    # A broken install without the default's weight file: the built-in model runs, and every case says so (in
    # the console and in its JSON), since its results differ from the documented default's.
    from COVIDLesionSegLib import catalogue

    manifest = json.loads(catalogue.MANIFEST_PATH.read_text())
    default = manifest["defaults"]["infection"]
    if default == catalogue.BUILTIN_DEFAULTS["infection"]:
        pytest.skip("the default infection model is the built-in one")
    copy = tmp_path / "models" / "manifest.json"         # the manifest without the weight files beside it
    copy.parent.mkdir()
    copy.write_text(json.dumps(manifest))
    monkeypatch.setattr(catalogue, "MANIFEST_PATH", copy)
    assert catalogue.default_model_id("infection") == catalogue.BUILTIN_DEFAULTS["infection"]
    ct, _ = _phantom_file(tmp_path)
    out = tmp_path / "out"
    assert main(["segment", str(ct), "-o", str(out), "--no-report"]) == 0
    err = capsys.readouterr().err
    assert f"the default infection model {default!r} is not available" in err and "Reinstall" in err
    report = json.loads((out / "phantom.json").read_text())
    assert report["models"]["infection"]["id"] == catalogue.BUILTIN_DEFAULTS["infection"]
    assert any(default in note and "instead" in note for note in report["notes"])
    # With the shipped manifest (file present) there is no such note, and a chosen model never gets one.
    monkeypatch.undo()
    assert catalogue.default_fallback_note("infection") is None and catalogue.default_fallback_note("lungs") is None


def test_a_scan_too_large_to_write_in_parallel_gives_the_same_files_and_frees_its_pixels(tmp_path, monkeypatch):
    """Above PARALLEL_WRITE_VOXELS (a 1000-slice scan) the report, the labelmap and the .seg.nrrd are written
    one after the other and the CT's pixels are freed once the report is drawn: the files hold the same
    images and numbers as the parallel write's."""
    from COVIDLesionSegLib import pipeline as pipeline_module
    from COVIDLesionSegLib.outputs import read_segmentation_nrrd

    ct, _ = _phantom_file(tmp_path)
    pipeline = Pipeline(SegmentOptions(infection_model="hu-threshold"))
    together, _ = pipeline.segment_file(ct, tmp_path / "together")
    assert together.volume.image is not None                  # small scan: written in parallel, pixels kept
    monkeypatch.setattr(pipeline_module, "PARALLEL_WRITE_VOXELS", 0)
    in_turn, _ = pipeline.segment_file(ct, tmp_path / "in_turn")
    assert in_turn.volume.image is None                       # freed after the report
    with pytest.raises(RuntimeError, match="released"):
        _ = in_turn.volume.hu
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / run / "phantom_labels.nii.gz")))
              for run in ("together", "in_turn")]
    np.testing.assert_array_equal(*labels)
    segs_a, geo_a = read_segmentation_nrrd(tmp_path / "together" / "phantom.seg.nrrd")
    segs_b, geo_b = read_segmentation_nrrd(tmp_path / "in_turn" / "phantom.seg.nrrd")
    assert geo_a == geo_b and list(segs_a) == list(segs_b)
    for name in segs_a:
        np.testing.assert_array_equal(segs_a[name], segs_b[name])
    report_a = json.loads((tmp_path / "together" / "phantom.json").read_text())
    report_b = json.loads((tmp_path / "in_turn" / "phantom.json").read_text())
    assert report_a["quantification"] == report_b["quantification"]
    assert (tmp_path / "in_turn" / "phantom_report.pdf").stat().st_size > 10_000


def test_the_first_case_is_read_while_the_models_load(tmp_path, monkeypatch):
    """segment_batch starts reading the first case before the models load (ITK's reader and torch's import share
    two cores): here the model loader waits until the read has begun, which it never would if they ran in turn."""
    import threading

    from COVIDLesionSegLib import catalogue, io
    from COVIDLesionSegLib.pipeline import segment_batch

    ct, _ = _phantom_file(tmp_path)
    reading = threading.Event()
    real_read, real_load = io.read_input, catalogue.load_model

    def read(*args, **kwargs):
        reading.set()
        return real_read(*args, **kwargs)

    waited = []

    def load(*args, **kwargs):
        waited.append(reading.wait(timeout=20))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(io, "read_input", read)
    monkeypatch.setattr(catalogue, "load_model", load)
    report = segment_batch([ct], tmp_path / "out", SegmentOptions(lungs_only=True, case_report=False))
    assert waited == [True] and report.succeeded == [str(ct)]
    stages = json.loads((tmp_path / "out" / "phantom.json").read_text())["timings_s"]
    assert stages["read"] > 0 and stages["check"] > 0           # the background read's stages are the case's


def test_a_model_that_fails_to_load_ends_the_first_read_and_says_why(tmp_path, monkeypatch):
    import threading

    from COVIDLesionSegLib import catalogue
    from COVIDLesionSegLib.pipeline import segment_batch

    ct, _ = _phantom_file(tmp_path)

    def broken(*args, **kwargs):
        raise InputError("the model file is damaged")

    monkeypatch.setattr(catalogue, "load_model", broken)
    with pytest.raises(InputError, match="damaged"):
        segment_batch([ct], tmp_path / "out", SegmentOptions())
    assert not [t for t in threading.enumerate() if t.name.startswith("covidlesionseg-read")]
    assert not list((tmp_path / "out").glob("phantom*"))


def test_a_complete_first_case_is_not_read_again(tmp_path, monkeypatch):
    from COVIDLesionSegLib import io
    from COVIDLesionSegLib.pipeline import segment_batch

    ct, _ = _phantom_file(tmp_path)
    options = SegmentOptions(lungs_only=True, case_report=False)
    assert segment_batch([ct], tmp_path / "out", options).succeeded == [str(ct)]
    reads = []
    real_read = io.read_input
    monkeypatch.setattr(io, "read_input", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    again = segment_batch([ct], tmp_path / "out", options)
    assert reads == [] and [p for p, _ in again.failed] == [str(ct)]       # refused: "exists", nothing read
    overwrite = segment_batch([ct], tmp_path / "out", SegmentOptions(lungs_only=True, case_report=False,
                                                                     overwrite=True))
    assert len(reads) == 1 and overwrite.succeeded == [str(ct)]
