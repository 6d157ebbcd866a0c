"""Output writers: Slicer .seg.nrrd (checked with slicer-core's real MRML reader), terminology file,
labelmap, JSON report, results.csv, atomic writes and overwrite protection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib import LABEL_INFECTION, LABEL_LEFT_LUNG, LABEL_RIGHT_LUNG, outputs
from COVIDLesionSegLib.outputs import (
    OutputExistsError,
    ResultsHeaderMismatchError,
    atomic_write,
    check_outputs_free,
    compose_labelmap,
    ijk_to_ras_matrix,
    read_results_csv,
    read_segment_tags,
    read_segmentation_nrrd,
    update_results_row,
    write_json_report,
    write_labelmap,
    write_segmentation_nrrd,
)
from COVIDLesionSegLib.quantify import CSV_COLUMNS
from COVIDLesionSegLib.segments import (
    INFECTION,
    LEFT_LUNG,
    REGION_CONTEXT_NAME,
    RIGHT_LUNG,
    SEGMENTS,
    TERMINOLOGY_CONTEXT_NAME,
    TERMINOLOGY_FILE,
    parse_terminology_entry,
)
from COVIDLesionSegLib.volume import Geometry

# ---------------------------------------------------------------------------------------------- helpers

def _rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = math.radians(degrees)
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


def oblique_geometry(size=(13, 11, 9)) -> Geometry:
    """Anisotropic spacing, non-zero origin, axes permuted and flipped, then rotated 17 degrees (oblique)."""
    permutation = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)  # i -> +P, j -> -S, k -> -L
    direction = _rotation((1, 2, 0.5), 17) @ permutation
    return Geometry(size=size, spacing=(0.71, 1.37, 2.5), origin=(-120.25, 33.5, 412.75),
                    direction=tuple(direction.ravel()))


def known_masks(geometry: Geometry, seed: int = 3) -> dict[str, np.ndarray]:
    """Irregular masks: two disjoint 'lungs' with random holes and an infection overlapping both."""
    rng = np.random.default_rng(seed)
    shape = tuple(reversed(geometry.size))
    z, y, x = np.indices(shape)
    right = (x < shape[2] // 2 - 1) & (rng.random(shape) > 0.2)
    left = (x > shape[2] // 2) & (y > 1) & (rng.random(shape) > 0.2)
    infection = (right | left) & (z >= 3) & (rng.random(shape) > 0.5)
    assert (infection & right).any() and (infection & left).any()
    return {RIGHT_LUNG.name: right, LEFT_LUNG.name: left, INFECTION.name: infection}


def partial_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".partial" in p.name]


# ------------------------------------------------------------------------------- slicer-core MRML scene

@pytest.fixture(scope="module")
def mrml():
    """A real MRML scene with the logics a segmentation round trip needs (as mrml.create_standalone_scene)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    logics = {}
    for name, cls in (("Colors", slicer.vtkMRMLColorLogic), ("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("Terminologies", slicer.vtkSlicerTerminologiesModuleLogic)):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic  # keep Python references alive (see mrml.StandaloneScene)
    logics["Colors"].AddDefaultColorNodes()
    yield {"slicer": slicer, "scene": scene, "app": app_logic, **logics}
    scene.Clear(1)


def _load_segmentation(mrml, path: Path):
    scene = mrml["scene"]
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node) == 1, f"Slicer could not read {path}"
    return node


def _reference_volume(mrml, geometry: Geometry, folder: Path):
    """The input image's grid loaded by Slicer's own volume reader (independent of our geometry code)."""
    image = sitk.Image(*geometry.size, sitk.sitkUInt8)
    geometry.apply_to(image)
    path = folder / "reference.nrrd"
    sitk.WriteImage(image, str(path))
    return mrml["Volumes"].AddArchetypeVolume(str(path), "reference")


def _matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _segment_tag(segment, tag: str) -> str:
    import vtk
    value = vtk.mutable("")
    assert segment.GetTag(tag, value), f"segment {segment.GetName()} has no {tag} tag"
    return str(value)


# ------------------------------------------------------------------------------------------ terminology

def test_terminology_file_loads_in_slicer_with_our_codes_and_colours(mrml):
    slicer = mrml["slicer"]
    logic = mrml["Terminologies"]
    assert logic.LoadTerminologyFromFile(str(TERMINOLOGY_FILE)) == TERMINOLOGY_CONTEXT_NAME
    for seg in SEGMENTS:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(seg.terminology_entry(), entry)
        # Fill metadata (colour, 3dSlicerLabel) from the loaded file: fails if the codes are not in it.
        assert logic.UpdateEntryFromLoadedTerminologies(entry, [TERMINOLOGY_CONTEXT_NAME], [])
        assert entry.GetCategoryObject().GetCodeValue() == seg.category.value
        assert entry.GetTypeObject().GetCodeValue() == seg.type.value
        modifier = entry.GetTypeModifierObject()
        assert modifier.GetCodeValue() == seg.type_modifier.value
        assert tuple(modifier.GetRecommendedDisplayRGBValue()) == seg.color_rgb255
        assert modifier.GetSlicerLabel() == seg.slicer_label
        # Anatomy selection is shown for the lesion category only (lungs are anatomy themselves).
        assert bool(entry.GetCategoryObject().GetShowAnatomy()) == (seg.region is not None)
        # Slicer finds the term by its plain label, as it does for segments named by users.
        found = slicer.vtkSlicerTerminologyEntry()
        assert logic.FindTypeInTerminologyBy3dSlicerLabel(TERMINOLOGY_CONTEXT_NAME, seg.slicer_label, found)
        assert found.GetTypeModifierObject().GetCodeValue() == seg.type_modifier.value


def test_terminology_entry_string_matches_slicer_serialisation(mrml):
    slicer = mrml["slicer"]
    logic_cls = slicer.vtkSlicerTerminologiesModuleLogic
    for seg in SEGMENTS:
        ours = seg.terminology_entry()

        def parts(code):
            return (code.value, code.scheme, code.meaning) if code else ("", "", "")
        theirs = logic_cls.SerializeTerminologyEntry(
            TERMINOLOGY_CONTEXT_NAME, *parts(seg.category), *parts(seg.type), *parts(seg.type_modifier),
            REGION_CONTEXT_NAME, *parts(seg.region), *parts(seg.region_modifier))
        assert ours == theirs
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic_cls.DeserializeTerminologyEntry(ours, entry)
        assert entry.GetTerminologyContextName() == TERMINOLOGY_CONTEXT_NAME
        assert entry.GetRegionContextName() == REGION_CONTEXT_NAME
        assert (entry.GetRegionObject().GetCodeValue() or "") == (seg.region.value if seg.region else "")
        assert logic_cls.SerializeTerminologyEntry(entry) == ours
        parsed = parse_terminology_entry(ours)
        assert parsed["type_modifier"] == seg.type_modifier and parsed["region"] == seg.region
    assert INFECTION.region is not None and INFECTION.region.value == "39607008"
    assert (RIGHT_LUNG.type_modifier.value, LEFT_LUNG.type_modifier.value) == ("24028007", "7771000")
    assert SEGMENTS.infection is INFECTION and list(SEGMENTS) == [RIGHT_LUNG, LEFT_LUNG, INFECTION]
    assert [s.label for s in SEGMENTS] == [LABEL_RIGHT_LUNG, LABEL_LEFT_LUNG, LABEL_INFECTION]


# ------------------------------------------------------------------------------------------- .seg.nrrd

def test_seg_nrrd_round_trip_through_slicer_segmentation_node(tmp_path, mrml):
    geometry = oblique_geometry()
    masks = known_masks(geometry)
    path = write_segmentation_nrrd(tmp_path / "case.seg.nrrd", masks, geometry)
    assert path.is_file() and not partial_files(tmp_path)

    node = _load_segmentation(mrml, path)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    assert segmentation.GetNumberOfLayers() == 2  # lungs share a layer, the overlapping infection has its own
    reference = _reference_volume(mrml, geometry, tmp_path)
    expected_ras = ijk_to_ras_matrix(geometry)
    import vtk
    reference_ras = vtk.vtkMatrix4x4()
    reference.GetIJKToRASMatrix(reference_ras)
    # Slicer's volume reader and our LPS->RAS matrix agree on the input grid.
    np.testing.assert_allclose(_matrix(reference_ras), expected_ras, atol=1e-9)

    expected_layer = {RIGHT_LUNG.name: (0, 1), LEFT_LUNG.name: (0, 2), INFECTION.name: (1, 1)}
    for index, seg in enumerate(SEGMENTS):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        assert segment_id == seg.id
        assert segment.GetName() == seg.name
        np.testing.assert_allclose(segment.GetColor(), seg.color, atol=1e-6)
        assert _segment_tag(segment, "TerminologyEntry") == seg.terminology_entry()
        assert (segmentation.GetLayerIndex(segment_id), segment.GetLabelValue()) == expected_layer[seg.name]

        # The stored labelmap itself is on the input grid (no resampling involved).
        oriented = mrml["slicer"].vtkOrientedImageData()
        node.GetBinaryLabelmapRepresentation(segment_id, oriented)
        world = vtk.vtkMatrix4x4()
        oriented.GetImageToWorldMatrix(world)
        np.testing.assert_allclose(_matrix(world), expected_ras, atol=1e-9)

        # Export onto the reference volume: voxel-for-voxel equal to the mask we wrote.
        labelmap = mrml["scene"].AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        assert mrml["Segmentations"].ExportSegmentsToLabelmapNode(node, ids, labelmap, reference)
        import slicer.util
        exported = slicer.util.arrayFromVolume(labelmap)
        assert exported.shape == masks[seg.name].shape
        np.testing.assert_array_equal(exported > 0, masks[seg.name])
        labelmap_ras = vtk.vtkMatrix4x4()
        labelmap.GetIJKToRASMatrix(labelmap_ras)
        np.testing.assert_allclose(_matrix(labelmap_ras), expected_ras, atol=1e-9)

    # Slicer knows the source grid, so editing in Slicer happens on the input's voxels.
    stored = segmentation.GetConversionParameter("Reference image geometry")
    values = [float(v) for v in stored.split(";") if v]
    np.testing.assert_allclose(np.reshape(values[:16], (4, 4)), expected_ras, atol=1e-9)
    assert values[16:] == [0, geometry.size[0] - 1, 0, geometry.size[1] - 1, 0, geometry.size[2] - 1]


def test_seg_nrrd_reader_round_trip_and_header(tmp_path):
    geometry = oblique_geometry()
    masks = known_masks(geometry, seed=11)
    path = write_segmentation_nrrd(tmp_path / "a.seg.nrrd", masks, geometry)
    back, back_geometry = read_segmentation_nrrd(path)
    assert list(back) == list(masks)
    for name in masks:
        np.testing.assert_array_equal(back[name], masks[name])
    assert back_geometry.size == geometry.size
    np.testing.assert_allclose(back_geometry.spacing, geometry.spacing, rtol=1e-12)
    np.testing.assert_allclose(back_geometry.origin, geometry.origin, rtol=1e-12)
    np.testing.assert_allclose(back_geometry.direction, geometry.direction, atol=1e-12)

    import nrrd
    header = nrrd.read_header(str(path))
    assert header["dimension"] == 4 and list(header["kinds"]) == ["list", "domain", "domain", "domain"]
    assert header["space"] == "left-posterior-superior" and header["encoding"] == "gzip"
    assert list(header["sizes"]) == [2, *geometry.size]
    # Extents are the masks' bounding boxes in (i, j, k) = (x, y, z) voxel indices.
    right = masks[RIGHT_LUNG.name]
    zz, yy, xx = np.nonzero(right)
    assert header["Segment0_Extent"] == f"{xx.min()} {xx.max()} {yy.min()} {yy.max()} {zz.min()} {zz.max()}"
    tags = read_segment_tags(path)
    assert tags[INFECTION.name]["TerminologyEntry"] == INFECTION.terminology_entry()


@pytest.mark.parametrize("breakage", ["missing", "changed signature"])
def test_nrrd_writer_falls_back_to_pynrrd_public_writer(tmp_path, monkeypatch, breakage):
    # The streaming writer uses pynrrd's private header functions; a pynrrd release that renames or changes
    # them must give the same file through pynrrd's public writer, not a crash or a file without a header.
    # A pynrrd whose private helpers differ, but whose public writer works: the stand-in public writer puts
    # the real helpers back for the duration of its own call.
    import nrrd.writer

    real_helper, real_write, public_calls = nrrd.writer._write_header, nrrd.write, []

    def public_write(*args, **kwargs):
        public_calls.append(1)
        with monkeypatch.context() as inside:
            inside.setattr(nrrd.writer, "_write_header", real_helper, raising=False)
            return real_write(*args, **kwargs)

    if breakage == "missing":
        monkeypatch.delattr(nrrd.writer, "_write_header")
    else:
        monkeypatch.setattr(nrrd.writer, "_write_header", lambda fh: fh.write(b"never"))
    monkeypatch.setattr(nrrd, "write", public_write)
    geometry = oblique_geometry()
    masks = known_masks(geometry, seed=5)
    path = write_segmentation_nrrd(tmp_path / "a.seg.nrrd", masks, geometry)
    assert public_calls == [1]
    back, _ = read_segmentation_nrrd(path)
    for name in masks:
        np.testing.assert_array_equal(back[name], masks[name])


def test_seg_nrrd_single_layer_and_empty_segment_load_in_slicer(tmp_path, mrml):
    """Lungs-only output: an empty infection segment; no overlap, so a plain 3D file with one layer."""
    geometry = Geometry(size=(8, 7, 6), spacing=(0.8, 0.8, 3.0), origin=(10.0, -20.0, -300.0),
                        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    masks = known_masks(geometry)
    masks[INFECTION.name] = np.zeros_like(masks[INFECTION.name])
    path = write_segmentation_nrrd(tmp_path / "lungs.seg.nrrd", masks, geometry)
    import nrrd
    header = nrrd.read_header(str(path))
    assert header["dimension"] == 3
    assert header["Segment2_Extent"] == "0 -1 0 -1 0 -1"

    node = _load_segmentation(mrml, path)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3 and segmentation.GetNumberOfLayers() == 1
    assert segmentation.GetSegment(INFECTION.id).GetName() == INFECTION.name
    back, _ = read_segmentation_nrrd(path)
    assert not back[INFECTION.name].any()
    np.testing.assert_array_equal(back[LEFT_LUNG.name], masks[LEFT_LUNG.name])


def test_reader_handles_files_written_by_slicer(tmp_path, mrml):
    """Slicer crops the voxels it writes to the segments' bounding box; our reader follows the file grid."""
    geometry = oblique_geometry()
    masks = known_masks(geometry, seed=5)
    masks[RIGHT_LUNG.name][:2] = False  # make the bounding box smaller than the grid
    ours = write_segmentation_nrrd(tmp_path / "ours.seg.nrrd", masks, geometry)
    node = _load_segmentation(mrml, ours)
    storage = mrml["scene"].AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "slicer.seg.nrrd"))
    assert storage.WriteData(node) == 1
    back, grid = read_segmentation_nrrd(tmp_path / "slicer.seg.nrrd")
    assert [n for n in back] == [s.name for s in SEGMENTS]
    # Locate the cropped grid inside the original one through the physical coordinates.
    offset = np.linalg.solve(outputs.ijk_to_lps_matrix(geometry), [*grid.origin, 1.0])[:3]
    np.testing.assert_allclose(offset, np.round(offset), atol=1e-6)
    i0, j0, k0 = (int(round(v)) for v in offset)
    sx, sy, sz = grid.size
    for name, mask in masks.items():
        np.testing.assert_array_equal(back[name], mask[k0:k0 + sz, j0:j0 + sy, i0:i0 + sx])
        assert back[name].sum() == mask.sum()


def test_seg_nrrd_rejects_bad_input(tmp_path):
    geometry = oblique_geometry()
    masks = known_masks(geometry)
    with pytest.raises(ValueError, match="does not match"):
        write_segmentation_nrrd(tmp_path / "x.seg.nrrd", {RIGHT_LUNG.name: masks[RIGHT_LUNG.name][:-1]}, geometry)
    with pytest.raises(ValueError, match="no segment definition"):
        write_segmentation_nrrd(tmp_path / "x.seg.nrrd", {"Liver": masks[RIGHT_LUNG.name]}, geometry)
    with pytest.raises(ValueError, match="boolean or 0/1"):
        write_segmentation_nrrd(tmp_path / "x.seg.nrrd", {RIGHT_LUNG.name: masks[RIGHT_LUNG.name] * 2}, geometry)
    assert not list(tmp_path.iterdir())


def test_pack_layers_puts_overlapping_masks_in_separate_layers():
    a = np.zeros((2, 3, 4), bool)
    a[0] = True
    b = np.zeros_like(a)
    b[1] = True
    c = a.copy()
    c[1, 0] = True  # overlaps a and b
    d = np.zeros_like(a)
    assert outputs.pack_layers({"a": a, "b": b, "c": c, "d": d}) == [(0, 1), (0, 2), (1, 1), (0, 3)]


# ----------------------------------------------------------------------------------- atomic + overwrite

def test_atomic_write_failure_leaves_no_file_and_no_temp(tmp_path):
    target = tmp_path / "case_labels.nii.gz"

    def failing(tmp: Path):
        assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz")  # SimpleITK picks the format by suffix
        tmp.write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert list(tmp_path.iterdir()) == []

    target.write_text("previous result")
    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_text() == "previous result" and list(tmp_path.iterdir()) == [target]


def test_writers_clean_up_when_interrupted(tmp_path, monkeypatch):
    geometry = oblique_geometry()
    masks = known_masks(geometry)
    from COVIDLesionSegLib import outputs

    def broken_nrrd_write(fh, data, header, *args, **kwargs):
        fh.write(b"NRRD0005\ntype: uint8\n")
        raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C while compressing

    # The .seg.nrrd's header and data are written by outputs._write_nrrd (pynrrd's header, data compressed
    # in pieces): interrupt it there.
    monkeypatch.setattr(outputs, "_write_nrrd", broken_nrrd_write)
    with pytest.raises(KeyboardInterrupt):
        write_segmentation_nrrd(tmp_path / "case.seg.nrrd", masks, geometry)

    def broken_sitk_write(image, name, *args, **kwargs):
        Path(name).write_bytes(b"\x1f\x8b partial")
        raise RuntimeError("ITK write failed")

    monkeypatch.setattr(sitk, "WriteImage", broken_sitk_write)
    labels = compose_labelmap(*masks.values())
    with pytest.raises(RuntimeError, match="ITK write failed"):
        write_labelmap(tmp_path / "case_labels.nii.gz", labels, geometry)

    def broken_dump(*args, **kwargs):
        raise TypeError("not serialisable")

    monkeypatch.setattr(json, "dumps", broken_dump)
    with pytest.raises(TypeError):
        write_json_report(tmp_path / "case.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_check_outputs_free(tmp_path):
    existing = tmp_path / "case.seg.nrrd"
    existing.write_text("x")
    other = tmp_path / "case.json"
    check_outputs_free([other], overwrite=False)  # nothing exists: fine
    check_outputs_free([existing, other], overwrite=True)
    with pytest.raises(OutputExistsError) as info:
        check_outputs_free([existing, other], overwrite=False)
    message = str(info.value)
    assert str(existing) in message and str(other) not in message and "--overwrite" in message
    assert info.value.existing == [existing]
    assert isinstance(info.value, FileExistsError)


# ------------------------------------------------------------------------------------------- labelmap

def test_compose_and_write_labelmap_keep_geometry_and_precedence(tmp_path):
    geometry = oblique_geometry()
    masks = known_masks(geometry)
    labels = compose_labelmap(masks[RIGHT_LUNG.name], masks[LEFT_LUNG.name], masks[INFECTION.name])
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels == LABEL_INFECTION, masks[INFECTION.name])
    np.testing.assert_array_equal(labels == LABEL_RIGHT_LUNG, masks[RIGHT_LUNG.name] & ~masks[INFECTION.name])
    np.testing.assert_array_equal(labels == LABEL_LEFT_LUNG, masks[LEFT_LUNG.name] & ~masks[INFECTION.name])

    path = write_labelmap(tmp_path / "case_labels.nii.gz", labels, geometry)
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip, though written under a temporary name
    image = sitk.ReadImage(str(path))
    assert image.GetPixelID() == sitk.sitkUInt8
    assert geometry.matches(image, tol=1e-5)  # NIfTI stores the geometry in float32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)

    # The same through a SimpleITK image carrying its own geometry.
    as_image = sitk.GetImageFromArray(labels)
    geometry.apply_to(as_image)
    path2 = write_labelmap(tmp_path / "img_labels.nii.gz", as_image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path2))), labels)
    assert not partial_files(tmp_path)


def test_write_labelmap_rejects_bad_input(tmp_path):
    geometry = oblique_geometry()
    labels = np.zeros(tuple(reversed(geometry.size)), np.uint8)
    with pytest.raises(ValueError, match="geometry"):
        write_labelmap(tmp_path / "a.nii.gz", labels)
    labels[0, 0, 0] = 7
    with pytest.raises(ValueError, match="values"):
        write_labelmap(tmp_path / "a.nii.gz", labels, geometry)
    with pytest.raises(ValueError, match="does not match"):
        write_labelmap(tmp_path / "a.nii.gz", labels[1:], geometry)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------- JSON and CSV

def test_json_report_writes_nan_as_null_and_numpy_as_plain(tmp_path):
    report = {"volume_ml": np.float32(12.5), "voxels": np.int64(7), "pct": float("nan"), "inf": np.inf,
              "nested": {"arr": np.array([1, 2]), "path": tmp_path, "flag": np.bool_(True)}}
    path = write_json_report(tmp_path / "case.json", report)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data == {"volume_ml": 12.5, "voxels": 7, "pct": None, "inf": None,
                    "nested": {"arr": [1, 2], "path": str(tmp_path), "flag": True}}
    assert text.startswith('{\n  "volume_ml"')  # indent 2
    with pytest.raises(TypeError, match="cannot write"):
        write_json_report(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists() and not partial_files(tmp_path)


def test_results_csv_keeps_one_row_per_case_with_fixed_columns(tmp_path):
    csv_path = tmp_path / "results.csv"
    update_results_row(csv_path, {"case": "a", "status": "ok", "right_lung_ml": 1234.5,
                                  "right_infected_pct": float("nan")})
    first = csv_path.read_bytes()
    update_results_row(csv_path, {"case": "b,with comma", "status": "failed", "error": "bad input\nsecond line"})
    assert csv_path.read_bytes().startswith(first)  # earlier rows kept byte for byte
    rows = read_results_csv(csv_path)
    assert [r["case"] for r in rows] == ["a", "b,with comma"]
    assert list(rows[0]) == list(outputs.RESULTS_COLUMNS)
    assert rows[0]["right_lung_ml"] == "1234.5" and rows[0]["right_infected_pct"] == ""
    assert rows[1]["error"] == "bad input\nsecond line"
    assert set(CSV_COLUMNS) <= set(outputs.RESULTS_COLUMNS)
    assert outputs.RESULTS_COLUMNS[:2] == ("case", "status")

    # A case's row is replaced in place, not added again.
    update_results_row(csv_path, {"case": "a", "status": "failed", "error": "again"})
    rows = read_results_csv(csv_path)
    assert [(r["case"], r["status"]) for r in rows] == [("a", "failed"), ("b,with comma", "failed")]
    assert rows[0]["right_lung_ml"] == ""

    with pytest.raises(ValueError, match="not results.csv columns"):
        update_results_row(csv_path, {"case": "c", "colour": "red"})


def test_results_csv_header_mismatch_is_refused(tmp_path):
    csv_path = tmp_path / "results.csv"
    csv_path.write_text("case,status,volume\nold,ok,3\n")
    before = csv_path.read_bytes()
    with pytest.raises(ResultsHeaderMismatchError, match="different columns") as info:
        update_results_row(csv_path, {"case": "new"})
    assert "volume" in str(info.value)
    assert csv_path.read_bytes() == before and not partial_files(tmp_path)

    # Custom columns work, and a reordered header is also refused.
    custom = tmp_path / "custom.csv"
    update_results_row(custom, {"b": 2, "a": 1}, columns=["a", "b"])
    with pytest.raises(ResultsHeaderMismatchError, match="different order"):
        update_results_row(custom, {"a": 1}, columns=["b", "a"])
    assert custom.read_text().splitlines() == ["a,b", "1,2"]


def test_read_back_checks_catch_truncated_and_altered_files(tmp_path):
    """What the writers check before a rename: a cut or changed file (as a full disk leaves it) is refused."""
    geometry = oblique_geometry()
    masks = known_masks(geometry)
    labels = compose_labelmap(*masks.values())
    nifti = write_labelmap(tmp_path / "case_labels.nii.gz", labels, geometry)
    segmentation = write_segmentation_nrrd(tmp_path / "case.seg.nrrd", masks, geometry)
    outputs.verify_nifti(nifti, labels)
    outputs.verify_nrrd(segmentation)
    data = nifti.read_bytes()
    nifti.write_bytes(data[: len(data) // 2])
    with pytest.raises(outputs.OutputWriteError, match="ends early"):
        outputs.verify_nifti(nifti, labels)
    altered = labels.copy()
    altered[0, 0, 0] = 3 - altered[0, 0, 0]
    nifti.write_bytes(data)
    with pytest.raises(outputs.OutputWriteError, match="differ"):
        outputs.verify_nifti(nifti, altered)
    seg = segmentation.read_bytes()
    segmentation.write_bytes(seg[: len(seg) - 40])
    with pytest.raises(outputs.OutputWriteError, match="could not be written completely"):
        outputs.verify_nrrd(segmentation)
