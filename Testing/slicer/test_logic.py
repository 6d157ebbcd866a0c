"""The module's logic (COVIDLesionSeg.py -> COVIDLesionSegLib/slicer_logic.py) on slicer-core with real nodes.

One real chest CT (COVID-CT-MD P001, loaded with vtkSlicerVolumesLogic.AddArchetypeVolume) is segmented
once per test module and shared; synthetic volumes (the engine's phantom, downsampled, with oblique
anisotropic geometry) cover geometry, re-runs and lungs-only runs.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

import slicer
from COVIDLesionSegLib import catalogue, dependencies, mrml, outputs, phantom, quantify
from COVIDLesionSegLib.errors import InputError
from COVIDLesionSegLib.pipeline import Pipeline
from COVIDLesionSegLib.progress import Cancelled
from COVIDLesionSegLib.segments import SEGMENTS
from COVIDLesionSegLib.slicer_logic import SegmentationLogic
from COVIDLesionSegLib.volume import CTVolume
from Testing.conftest import readme_python_blocks, shared_file

from .conftest import processes_in_group
from .helpers import oblique_direction, segment_names, tag

SEGMENT_NAMES = [s.name for s in SEGMENTS]


def _node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


# ---------------------------------------------------------------------------------------------------------
# A real CT, segmented once through the module's Logic class
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_ct_run(module_scene, module_file):
    path = shared_file("ct/covidctmd_p001_ct.nii.gz")
    scene = module_scene.scene
    volume = module_scene.volumes_logic.AddArchetypeVolume(str(path), "P001")
    assert volume is not None
    # Put the CT under a patient/study as DICOM loading does, to check where the results go.
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "P001"), "Chest CT")
    sh.CreateItem(study, volume)
    progress = []
    run = module_file.COVIDLesionSegLogic().process(volume, None, device="cpu", waitForCompletion=True,
                                                    progressCallback=progress.append)
    return {"volume": volume, "run": run, "progress": progress, "study": study, "sh": sh, "path": path,
            "scene": module_scene}


def test_real_ct_segments(real_ct_run):
    run = real_ct_run["run"]
    assert run.state == "succeeded"
    segmentation_node = run.result.segmentation_node
    assert segment_names(segmentation_node) == SEGMENT_NAMES
    segmentation = segmentation_node.GetSegmentation()
    for definition in SEGMENTS:
        segment = segmentation.GetSegment(run.result.segment_ids[definition.name])
        assert np.allclose(segment.GetColor(), definition.color, atol=1e-6)
        assert tag(segment, segment.GetTerminologyEntryTagName()) == definition.terminology_entry()
        assert tag(segment, mrml.GENERATED_TAG).startswith("hu-lungs")
    masks = mrml.masks_from_segmentation(segmentation_node, real_ct_run["volume"])
    right, left, infection = (masks[n] for n in SEGMENT_NAMES)
    assert right.sum() > 1e6 and left.sum() > 1e6           # ~2.9 M voxels each at 0.75 x 0.75 x 2 mm
    assert not (right & left).any()
    assert infection.any() and not (infection & ~(right | left)).any()


def test_real_ct_progress(real_ct_run):
    progress = real_ct_run["progress"]
    overall = [p.overall for p in progress]
    assert overall == sorted(overall) and 0.0 <= overall[0] and overall[-1] <= 1.0
    assert {"lungs", "infection", "quantify", "write"} <= {p.stage for p in progress}
    assert any(p.remaining_s is not None for p in progress)


def test_real_ct_reference_geometry_is_the_input(real_ct_run):
    volume = real_ct_run["volume"]
    segmentation = real_ct_run["run"].result.segmentation_node.GetSegmentation()
    reference = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(
        segmentation.GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()),
        reference)
    matrix = vtk.vtkMatrix4x4()
    reference.GetImageToWorldMatrix(matrix)
    assert np.allclose(_matrix(matrix), mrml.ijk_to_ras_array(volume), atol=1e-9)
    dims = volume.GetImageData().GetDimensions()
    assert reference.GetExtent() == (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)


def test_real_ct_saved_segmentation_matches_the_file_geometry(real_ct_run, tmp_path):
    """Saved through Slicer's storage node, the segments sit exactly on the CT file's voxel grid."""
    path = tmp_path / "P001.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)   # faster; the layout is the same
    assert storage.WriteData(real_ct_run["run"].result.segmentation_node)
    masks, geometry = outputs.read_segmentation_nrrd(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(real_ct_run["path"]))
    reader.ReadImageInformation()
    ct = sitk.Image(reader.GetSize(), sitk.sitkUInt8)    # the CT file's grid, without reading its voxels
    ct.SetSpacing(reader.GetSpacing())
    ct.SetOrigin(reader.GetOrigin())
    ct.SetDirection(reader.GetDirection())
    # Slicer crops the saved labelmap to the segments' extent; resample onto the CT grid to compare voxels.
    expected = mrml.masks_from_segmentation(real_ct_run["run"].result.segmentation_node, real_ct_run["volume"])
    for name in SEGMENT_NAMES:
        saved = sitk.GetImageFromArray(masks[name].astype(np.uint8))
        geometry.apply_to(saved)
        on_ct = sitk.Resample(saved, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        assert np.array_equal(sitk.GetArrayViewFromImage(on_ct).astype(bool), expected[name]), name
    assert np.allclose(geometry.direction, ct.GetDirection(), atol=1e-9)
    assert np.allclose(geometry.spacing, ct.GetSpacing(), atol=1e-9)


def test_real_ct_results_go_under_the_study(real_ct_run):
    sh, study = real_ct_run["sh"], real_ct_run["study"]
    result = real_ct_run["run"].result
    for node in (result.segmentation_node, result.table_node):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study


def test_real_ct_table_equals_the_engine_report(real_ct_run):
    result = real_ct_run["run"].result
    quantities = result.report["quantification"]
    rows = {row[mrml.REGION_COLUMN]: row for row in mrml.table_as_dicts(result.table_node)}
    checked = 0
    for label, side, zone in mrml.TABLE_ROWS:
        entry = quantities[quantify.REPORT_KEYS[side]]
        entry = entry["zones"][zone] if zone else entry
        for title, key, _ in mrml.TABLE_COLUMNS:
            expected = entry.get(key)     # the halves have no zone score
            value = rows[label][title]
            assert math.isnan(value) if expected is None else value == expected, (label, title)
            checked += 1
    assert checked == len(mrml.TABLE_ROWS) * len(mrml.TABLE_COLUMNS)
    # The engine's report agrees with the segments actually stored (volumes from voxel counts).
    masks = mrml.masks_from_segmentation(result.segmentation_node, real_ct_run["volume"])
    voxel_ml = float(np.prod(real_ct_run["volume"].GetSpacing())) / 1000.0
    right = quantities[quantify.REPORT_KEYS["right"]]
    assert right["volume_ml"] == pytest.approx(masks["Right lung"].sum() * voxel_ml, abs=1e-3)
    assert right["infection_ml"] == pytest.approx((masks["Right lung"] & masks["COVID-19 infection"]).sum()
                                                  * voxel_ml, abs=1e-3)
    assert rows["Both lungs"]["Infected"] > 0
    assert rows["Both lungs"]["Zone score"] == quantities["severity"]["zone_score"]
    assert rows["Both lungs"]["High opacity"] == quantities["severity"]["percentage_of_high_opacity"]["both_lungs"]


@pytest.mark.skipif(os.name == "nt", reason="process groups and /proc are POSIX")
def test_cancel_mid_run_leaves_the_scene_unchanged(real_ct_run, module_file):
    scene = real_ct_run["scene"].scene
    volume = real_ct_run["volume"]
    before = _node_ids(scene)
    stages = []
    run = module_file.COVIDLesionSegLogic().process(volume, None, device="cpu", waitForCompletion=False,
                                                    progressCallback=lambda p: stages.append(p.stage))
    pid = run.worker.pid
    workdir = run._workdir
    assert workdir.is_dir()
    deadline = time.monotonic() + 120
    while "lungs" not in stages and time.monotonic() < deadline:
        assert run.poll(), run.error
        time.sleep(0.05)
    assert "lungs" in stages, "the worker never reached the lung stage"
    run.cancel()
    assert run.state == "cancelled" and run.result is None
    assert _node_ids(scene) == before
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert processes_in_group(pid) == []
    assert not workdir.exists()
    assert not run.poll()          # a cancelled run stays cancelled


# ---------------------------------------------------------------------------------------------------------
# Synthetic volumes
# ---------------------------------------------------------------------------------------------------------

def _oblique_phantom(scene):
    """The engine's phantom on a coarse anisotropic grid, stored with an oblique, x-flipped direction.

    Flipping the x axis puts the voxels the phantom built as the patient's *left* lung on the patient's
    *right*: a correct pipeline follows the direction matrix and calls them the right lung.
    """
    image, truth = phantom.make_chest_phantom(shape_zyx=(40, 96, 104), spacing_zyx=(6.0, 3.6, 3.4))
    image.SetDirection(oblique_direction(flip_x=True))
    image.SetOrigin((150.0, -160.0, -120.0))
    node = mrml.volume_node_from_image(image, scene, "oblique phantom")
    return node, image, truth


def test_oblique_anisotropic_volume(scene):
    volume, image, truth = _oblique_phantom(scene.scene)
    logic = SegmentationLogic(scene.scene)
    run = logic.process(volume, None, wait_for_completion=True)
    masks = mrml.masks_from_segmentation(run.result.segmentation_node, volume)

    # Same voxels as the engine gives for the same image outside MRML.
    expected = Pipeline().run(CTVolume.from_image(image)).masks_in_input_geometry()
    for name in SEGMENT_NAMES:
        assert np.array_equal(masks[name], expected[name]), name

    # Sides follow the direction matrix: the phantom's "left" voxels are now the patient's right lung.
    def dice(a, b):
        return 2 * np.count_nonzero(a & b) / (a.sum() + b.sum())

    assert dice(masks["Right lung"], truth["left_lung"]) > 0.85
    assert dice(masks["Left lung"], truth["right_lung"]) > 0.85
    ijk_to_ras = mrml.ijk_to_ras_array(volume)

    def centroid_ras(mask):
        k, j, i = np.nonzero(mask)
        return (ijk_to_ras @ np.stack([i.mean(), j.mean(), k.mean(), 1.0]))[:3]

    # RAS: +x points to the patient's right.
    assert centroid_ras(masks["Right lung"])[0] > centroid_ras(masks["Left lung"])[0] + 50


def test_rerun_keeps_user_segments(scene):
    volume, _, _ = _oblique_phantom(scene.scene)
    logic = SegmentationLogic(scene.scene)
    first = logic.process(volume, None, wait_for_completion=True)
    segmentation_node = first.result.segmentation_node
    segmentation = segmentation_node.GetSegmentation()
    user_id = segmentation.AddEmptySegment("", "Radiologist note", [0.2, 0.8, 0.2])
    user_mask = np.zeros_like(mrml.masks_from_segmentation(segmentation_node, volume)["Right lung"])
    user_mask[10:14, 40:50, 30:40] = True
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        mrml._oriented_mask(user_mask.astype(np.uint8), mrml.ijk_to_ras_array(volume)), segmentation_node, user_id,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    table = first.result.table_node
    nodes_before = _node_ids(scene.scene)

    second = logic.process(volume, segmentation_node, wait_for_completion=True, results_table=table,
                           replace_existing=True)
    assert second.result.segmentation_node is segmentation_node and second.result.table_node is table
    assert _node_ids(scene.scene) == nodes_before      # no duplicate nodes on re-run
    assert sorted(segment_names(segmentation_node)) == sorted(SEGMENT_NAMES + ["Radiologist note"])
    assert segmentation.GetSegment(user_id) is not None
    assert np.array_equal(mrml.masks_from_segmentation(segmentation_node, volume)["Radiologist note"], user_mask)


def test_readme_scripting_example_runs_in_slicer(scene, module_file, capsys):
    """The README's "inside Slicer" example, as printed, with the nodes it names."""
    blocks = [b for b in readme_python_blocks() if "from COVIDLesionSeg import" in b]
    assert len(blocks) == 1
    volume, _, _ = _oblique_phantom(scene.scene)
    segmentation = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "README example")
    namespace = {"volumeNode": volume, "segmentationNode": segmentation}
    exec(compile(blocks[0], "README.md (Slicer scripting example)", "exec"), namespace)
    run = namespace["run"]
    assert run.state == "succeeded" and run.result.segmentation_node is segmentation
    assert segment_names(segmentation) == SEGMENT_NAMES
    printed = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == run.result.quantities["both_lungs"]["infected_percent"]
    assert namespace["logic"].modelsPath == catalogue.cache_dir()


def test_the_logic_owns_the_model_folder(scene, module_file, monkeypatch, tmp_path):
    """The folder chosen in the module (Slicer's settings) is read by the logic itself, so scripts and
    ``Slicer --python-script batch.py`` (which build the logic, not the widget) use it, and so do workers."""
    import types

    from COVIDLesionSegLib import slicer_logic

    class Settings(dict):             # what slicer.app.userSettings() answers
        def value(self, key, default=None):
            return self.get(key, default)

        def setValue(self, key, value):
            self[key] = value

    settings = Settings({slicer_logic.MODEL_FOLDER_SETTING: str(tmp_path / "chosen")})
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(userSettings=lambda: settings), raising=False)
    monkeypatch.setenv(slicer_logic.MODEL_FOLDER_ENV, "")          # restored after the test
    logic = SegmentationLogic(scene.scene)
    assert logic.model_folder == tmp_path / "chosen" == catalogue.cache_dir()
    assert os.environ[slicer_logic.MODEL_FOLDER_ENV] == str(tmp_path / "chosen")   # worker processes inherit it
    module_logic = module_file.COVIDLesionSegLogic()
    module_logic.modelsPath = tmp_path / "other"                    # what the widget's folder picker does
    assert settings[slicer_logic.MODEL_FOLDER_SETTING] == str(tmp_path / "other")
    assert module_logic.modelsPath == catalogue.cache_dir() == tmp_path / "other"
    monkeypatch.setenv(slicer_logic.MODEL_FOLDER_ENV, str(tmp_path / "env"))   # a script's own choice wins
    assert SegmentationLogic(scene.scene).model_folder == tmp_path / "env"


def test_lungs_only(scene, module_file):
    volume, _, _ = _oblique_phantom(scene.scene)
    run = module_file.COVIDLesionSegLogic().process(volume, None, lungsOnly=True, waitForCompletion=True)
    assert segment_names(run.result.segmentation_node) == ["Right lung", "Left lung"]
    rows = mrml.table_as_dicts(run.result.table_node)
    assert all(math.isnan(r["Infected"]) for r in rows)
    assert rows[0]["Lung volume"] > 0


def test_background_run_through_the_worker(scene, module_file):
    volume, _, _ = _oblique_phantom(scene.scene)
    before = _node_ids(scene.scene)
    logs = []
    run = module_file.COVIDLesionSegLogic().process(volume, None, waitForCompletion=False, logCallback=logs.append)
    assert run.state == "running"
    assert _node_ids(scene.scene) == before        # nothing created until the result arrives
    run.wait(timeout=120)
    assert run.state == "succeeded", run.error
    assert segment_names(run.result.segmentation_node) == SEGMENT_NAMES
    assert any("Started the segmentation process" in line for line in logs)
    assert run._workdir is None                    # temporary files removed


def test_bad_input_is_refused_before_anything_runs(scene):
    windowed = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 256, (16, 96, 96)).astype(np.int16))
    volume = mrml.volume_node_from_image(windowed, scene.scene, "screenshot-like")
    before = _node_ids(scene.scene)
    logic = SegmentationLogic(scene.scene)
    with pytest.raises(InputError, match="0-255"):
        logic.process(volume, None, wait_for_completion=False)
    with pytest.raises(InputError, match="0-255"):
        logic.process(volume, None, wait_for_completion=True, use_worker=True)
    assert _node_ids(scene.scene) == before
    with pytest.raises(ValueError, match="device"):
        logic.process(volume, None, device="tpu")


def test_cancel_from_the_progress_callback_in_process(scene):
    volume, _, _ = _oblique_phantom(scene.scene)
    before = _node_ids(scene.scene)

    def stop_at_infection(progress):
        if progress.stage == "infection":
            raise Cancelled()

    with pytest.raises(Cancelled):
        SegmentationLogic(scene.scene).process(volume, None, wait_for_completion=True,
                                               progress_callback=stop_at_infection)
    assert _node_ids(scene.scene) == before


def test_module_self_test(scene, module_file):
    """The module's ScriptedLoadableModuleTest (what ctest runs in a Slicer build) passes here too."""
    module_file.COVIDLesionSegTest().runTest()


# ---------------------------------------------------------------------------------------------------------
# Dependencies (the decisions; the installers themselves belong to the Slicer application)
# ---------------------------------------------------------------------------------------------------------

def test_dependency_needs_follow_the_model(module_file, monkeypatch):
    logic = module_file.COVIDLesionSegLogic()
    assert logic.modelNeedsTorch("hu-threshold") is False
    assert logic.modelNeedsTorch("") is True                 # importing a checkpoint needs torch
    assert logic.modelNeedsTorch("no-such-model") is True
    assert logic.missingDependencies("hu-threshold") == []   # everything is installed here
    monkeypatch.setattr(dependencies, "BASE_REQUIREMENTS", (("scipy", "scipy>=1.10"), ("nopkg_x", "nopkg-x>=1")))
    monkeypatch.setattr(dependencies, "NETWORK_REQUIREMENTS", (("nopkg_y", "nopkg-y>=2"),))
    assert logic.missingDependencies("hu-threshold") == ["nopkg-x>=1"]
    assert logic.missingDependencies("", includeTorch=True) == ["nopkg-x>=1", "nopkg-y>=2"]


def test_install_never_hands_torch_or_simpleitk_to_pip(module_file, monkeypatch):
    """torch goes through PyTorchUtils; pip gets only the other packages, without touching torch/SimpleITK."""
    import sys
    import types

    calls = []
    monkeypatch.setattr(dependencies, "BASE_REQUIREMENTS", (("nopkg_x", "nopkg-x>=1"),))
    monkeypatch.setattr(dependencies, "NETWORK_REQUIREMENTS", (("nopkg_monai", "monai>=1.4"),))

    class FakeTorchLogic:   # stands in for PyTorchUtils.PyTorchUtilsLogic of the PyTorch extension
        @staticmethod
        def torchInstalled():
            return False

        def installTorch(self, askConfirmation=False, **kwargs):
            calls.append(("PyTorchUtils.installTorch", askConfirmation, kwargs.get("torchVersionRequirement")))
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=FakeTorchLogic))
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: calls.append(("pip_install", args)))
    import importlib.util as util

    real_find_spec = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    logic = module_file.COVIDLesionSegLogic()

    # Slicer before 5.12: slicer.util.pip_install, MONAI without its dependencies (they include torch).
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    logic.installDependencies("", includeTorch=True)
    assert calls == [("PyTorchUtils.installTorch", False, ">=2.1"), ("pip_install", "nopkg-x>=1"),
                     ("pip_install", "monai>=1.4 --no-deps")]

    # Slicer 5.12+: slicer.packaging.pip_ensure with torch and SimpleITK excluded, no second prompt.
    calls.clear()
    ensured = {}
    fake_packaging = types.SimpleNamespace(pip_ensure=lambda reqs, **kw: ensured.update(reqs=[str(r) for r in reqs], **kw))
    monkeypatch.setitem(sys.modules, "slicer.packaging", fake_packaging)
    monkeypatch.setattr(slicer, "packaging", fake_packaging, raising=False)
    logic.installDependencies("hu-threshold")
    assert calls == []                                      # no torch for the built-in model
    assert ensured["reqs"] == ["nopkg-x>=1"]
    assert set(ensured["skip_packages"]) == {"torch", "SimpleITK"} and ensured["prompt_install"] is False


# ---------------------------------------------------------------------------------------------------------
# Models listed by URL: fetched only on request
# ---------------------------------------------------------------------------------------------------------

def test_logic_downloads_a_url_model_only_when_asked(module_file, remote_model):
    served, record = remote_model
    logic = module_file.COVIDLesionSegLogic()
    entry = logic.modelEntry("big-variant")
    assert entry is not None and entry.url == record["url"] and not entry.available
    assert logic.modelEntry("no-such-model") is None
    downloaded = logic.downloadModel("big-variant")
    assert downloaded.available and downloaded.path.read_bytes() == served.read_bytes()
    assert logic.modelEntry("big-variant").available


# ---------------------------------------------------------------------------------------------------------
# Quality warnings in the log, the Report and Export DICOM actions (issue 15)
# ---------------------------------------------------------------------------------------------------------

def test_real_ct_warnings_reach_the_log_and_the_report_is_kept_on_the_table(real_ct_run, module_file):
    run = real_ct_run["run"]
    warnings = run.result.warnings
    assert "lungs_cut_by_scan_range" in [w["code"] for w in warnings]     # P001's lungs reach its lowest slice
    for warning in warnings:
        assert f"Warning: {warning['message']}" in run.log
    stored = module_file.COVIDLesionSegLogic().storedReport(run.result.table_node)
    assert stored["quantification"]["severity"] == run.result.report["quantification"]["severity"]
    assert stored["warnings"] == warnings


def test_warnings_go_to_python_logging(scene, caplog):
    """What the Slicer log shows: a warning record per quality warning (here the phantom cut at both ends)."""
    import logging

    image, _ = phantom.make_chest_phantom()
    cut = image[:, :, 9:30]
    volume = mrml.volume_node_from_image(cut, scene.scene, "cut phantom")
    with caplog.at_level(logging.WARNING, logger="COVIDLesionSeg"):
        run = SegmentationLogic(scene.scene).process(volume, None, device="cpu", wait_for_completion=True)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert run.result.warnings and all(f"COVIDLesionSeg: {w['message']}" in messages for w in run.result.warnings)


def test_report_and_dicom_export_from_the_scene(real_ct_run, module_file, tmp_path, monkeypatch):
    import highdicom as hd

    from COVIDLesionSegLib.dicom_export import DicomExportError
    from Testing.engine.dicom_series import write_ct_series
    from Testing.engine.test_reports import colour_pixels, render_pdf

    logic = module_file.COVIDLesionSegLogic()
    run, volume = real_ct_run["run"], real_ct_run["volume"]
    segmentation = run.result.segmentation_node
    report = logic.storedReport(run.result.table_node)
    pdf, page = logic.writeReport(volume, segmentation, report, tmp_path / "P001_report.pdf",
                                  tmp_path / "P001_report.html")
    slices = render_pdf(pdf, dpi=60)[1]
    assert all(colour_pixels(slices, s.color_rgb255) > 100 for s in SEGMENTS)
    assert "NOT FOR DIAGNOSTIC USE" in page.read_text(encoding="utf-8")

    # Loaded from a NIfTI file: no DICOM source, so the export action is off and the logic refuses.
    assert logic.dicomSourceFiles(volume) == []
    with pytest.raises(DicomExportError, match="not loaded from DICOM"):
        logic.exportDicom(volume, segmentation, report, tmp_path)
    # The same scan as the DICOM series it came from: the SEG references it and holds the segments' voxels.
    files = write_ct_series(sitk.ReadImage(str(real_ct_run["path"])), tmp_path / "dicom")
    import pydicom

    uids = [pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID for f in files]
    # What Slicer's DICOM loader leaves: the instance UIDs on the volume, the files in the application's
    # DICOM database (the one piece of the desktop application this test supplies: a UID -> file lookup).
    by_uid = dict(zip(uids, map(str, files)))
    monkeypatch.setattr(slicer, "dicomDatabase", type("Database", (), {"fileForInstance": lambda self, uid:
                                                                        by_uid.get(uid, "")})(), raising=False)
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    try:
        assert logic.dicomSourceFiles(volume) == [str(f) for f in files]
        written = logic.exportDicom(volume, segmentation, report, tmp_path / "export")
    finally:
        volume.RemoveAttribute("DICOM.instanceUIDs")
    seg = hd.seg.segread(str(written["paths"]["dicom_seg"]))
    assert [d.SegmentLabel for d in seg.SegmentSequence] == SEGMENT_NAMES
    masks = mrml.masks_from_segmentation(segmentation, volume)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2, 3],
                                               assert_missing_frames_are_empty=True)
    for number, name in enumerate(SEGMENT_NAMES):
        assert np.array_equal(pixels[..., number] > 0, masks[name]), name
    assert hd.sr.srread(str(written["paths"]["dicom_sr"])).SOPInstanceUID == written["sr"]["sop_instance_uid"]
