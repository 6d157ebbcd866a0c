"""``COVIDLesionSeg/Scripts/batch.py`` under plain Python with slicer-core (a real subprocess).

The job itself (two real CTs and one broken file, see ``conftest.BatchJob``) is started in the background
with the first test of this folder; these tests wait for it and check what it left.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import slicer
from COVIDLesionSegLib import io as engine_io
from COVIDLesionSegLib import outputs, quantify
from COVIDLesionSegLib.segments import SEGMENTS

from .conftest import BATCH_SCRIPT
from .helpers import _batch_module, segment_names, tag

CASES = ("covidctmd_normal001_ct", "covidctmd_p001_ct")


@pytest.fixture(scope="module")
def finished_batch(batch_job):
    status = batch_job.wait(timeout=900)
    return batch_job, status, batch_job.log.read_text(errors="replace")


def test_exit_status_reports_the_failure(finished_batch):
    _, status, log = finished_batch
    assert status == 1, log[-3000:]
    assert "2 of 3 case(s) segmented" in log
    assert "failed:" in log and "broken_ct.nii.gz" in log
    # The colour logic's search for the application's colour files is not printed as an error on every run.
    assert "FindDefaultColorFiles" not in log and "HomeDirectory is not set" not in log
    assert "Traceback" not in log


def test_every_case_has_its_reports_and_the_batch_a_summary(finished_batch):
    job, _, _ = finished_batch
    for case in CASES:
        assert (job.output / f"{case}_report.pdf").read_bytes()[:5] == b"%PDF-"
        assert "NOT FOR DIAGNOSTIC USE" in (job.output / f"{case}_report.html").read_text(encoding="utf-8")
        report = json.loads((job.output / f"{case}.json").read_text())
        assert report["outputs"]["pdf_report"] == f"{case}_report.pdf"
        assert "zone_score" in report["quantification"]["severity"]
    summary = (job.output / "report.html").read_text(encoding="utf-8")
    assert all(f'<a href="{case}_report.html">{case}</a>' in summary for case in CASES)
    assert "broken_ct" in summary


def test_results_csv_has_one_row_per_case(finished_batch):
    job, _, _ = finished_batch
    rows = {row["case"]: row for row in outputs.read_results_csv(job.output / "results.csv")}
    assert set(rows) == {"broken_ct", *CASES}
    assert rows["broken_ct"]["status"] == "failed"
    assert "cannot read" in rows["broken_ct"]["error"]
    infected = {}
    for case in CASES:
        row = rows[case]
        assert row["status"] == "ok" and row["error"] == ""
        report = json.loads((job.output / f"{case}.json").read_text())
        # Every quantification column of the row is the case's JSON report, as the command line writes it.
        expected = quantify.flatten_for_csv(report["quantification"])
        for column, value in expected.items():
            assert (row[column] == "") if value is None else float(row[column]) == pytest.approx(value), column
        both = report["quantification"][quantify.REPORT_KEYS["both"]]
        assert 2000 < both["volume_ml"] < 9000          # adult lungs, in mL
        infected[case] = both["infected_percent"]
    # COVID-19 patient vs a normal subject: the patient has clearly more infected lung.
    assert infected["covidctmd_p001_ct"] > 2 * infected["covidctmd_normal001_ct"]


@pytest.mark.parametrize("case", CASES)
def test_segmentations_reload_in_slicer_core(finished_batch, case):
    job, _, _ = finished_batch
    path = job.output / f"{case}.seg.nrrd"
    assert path.is_file()
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", case)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    assert segment_names(node) == [s.name for s in SEGMENTS]
    segmentation = node.GetSegmentation()
    for definition in SEGMENTS:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(definition.name))
        assert np.allclose(segment.GetColor(), definition.color, atol=1e-6)
        assert tag(segment, segment.GetTerminologyEntryTagName()) == definition.terminology_entry()
    masks, _geometry = outputs.read_segmentation_nrrd(path)
    assert masks["Right lung"].sum() > 1e6 and masks["Left lung"].sum() > 1e6
    scene.Clear(1)


def test_bad_arguments_and_empty_inputs(tmp_path):
    run = subprocess.run([sys.executable, str(BATCH_SCRIPT), "--output", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--input" in run.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    run = subprocess.run([sys.executable, str(BATCH_SCRIPT), "--input", str(empty), "--output", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no CT files" in run.stderr


def test_dicom_series_folder_becomes_a_volume_node(tmp_path):
    """Under plain Python a DICOM series is read with the engine's reader and put into a volume node."""
    import SimpleITK as sitk

    from COVIDLesionSegLib import io, mrml
    from Testing.conftest import shared_file

    folder = shared_file("dicom/ct_20_slices")
    batch = _batch_module()
    assert engine_io.expand_inputs([str(folder)]) == [folder]            # a series folder is one case
    context = batch.SceneContext()
    node = context.load(folder, "series")
    image = mrml.image_from_volume_node(node)
    expected, _ = io.read_image(folder)
    assert image.GetSize() == expected.GetSize() and image.GetSize()[2] == 20
    assert np.allclose(image.GetOrigin(), expected.GetOrigin()) and np.allclose(image.GetDirection(),
                                                                                 expected.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(expected))
    context.scene.Clear(1)


def test_case_collection(tmp_path):
    _batch_module()                  # the script imports cleanly under plain Python
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "b.nrrd").write_bytes(b"x")
    (tmp_path / "old.seg.nrrd").write_bytes(b"x")       # an earlier output, not an input
    (tmp_path / "readme.txt").write_text("x")
    series = tmp_path / "series1"
    series.mkdir()
    (series / "IM0001.dcm").write_bytes(b"x")
    cases = engine_io.expand_inputs([str(tmp_path), str(tmp_path / "a.nii.gz"), str(tmp_path / "missing.nii.gz")])
    assert [c.name for c in cases] == ["a.nii.gz", "b.nrrd", "series1", "missing.nii.gz"]
    assert engine_io.unique_case_names([tmp_path / "x" / "ct.nii.gz", tmp_path / "y" / "ct.nrrd"]) == ["ct", "ct_2"]
