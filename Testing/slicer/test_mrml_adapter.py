"""The MRML adapter (COVIDLesionSegLib/mrml.py) with real slicer-core nodes and masks made here.

Covers geometry (volume node <-> SimpleITK, oblique and anisotropic), segments (names, colours,
terminology, tags, reference geometry), the replace policies (never losing a user's segment or edit),
Subject Hierarchy placement, the results table and its CSV export, and the project's terminology file.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

import slicer
from COVIDLesionSegLib import mrml, quantify
from COVIDLesionSegLib.segments import SEGMENTS, TERMINOLOGY_FILE

from .helpers import oblique_direction, segment_names, tag

SEGMENT_NAMES = [s.name for s in SEGMENTS]


def synthetic_image(shape_zyx=(12, 20, 24), spacing=(0.7, 1.3, 3.1), seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.integers(-1000, 1000, size=shape_zyx).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((-12.5, 40.25, -100.0))
    image.SetDirection(oblique_direction())
    return image


def box_masks(shape_zyx) -> dict[str, np.ndarray]:
    z, y, x = shape_zyx
    right = np.zeros(shape_zyx, bool)
    left = np.zeros(shape_zyx, bool)
    infection = np.zeros(shape_zyx, bool)
    right[2:z - 2, 3:y - 3, 2:x // 2 - 1] = True
    left[2:z - 2, 3:y - 3, x // 2 + 1:x - 2] = True
    infection[4:6, 5:8, 3:6] = True            # inside the right lung: overlaps it
    return {"Right lung": right, "Left lung": left, "COVID-19 infection": infection}


def matrix_array(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


# ---------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------

def test_volume_node_round_trip_is_exact_for_oblique_anisotropic_images(scene):
    image = synthetic_image()
    node = mrml.volume_node_from_image(image, scene.scene, "oblique")
    back = mrml.image_from_volume_node(node)
    assert back.GetSize() == image.GetSize()
    assert back.GetSpacing() == image.GetSpacing()
    assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-12, rtol=0)
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-12, rtol=0)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    # The node's IJK-to-RAS is the LPS geometry with R and A negated: voxel (i, j, k) maps to the same
    # physical point in both conventions.
    ijk_to_ras = mrml.ijk_to_ras_array(node)
    index = (3, 7, 5)
    lps = np.array(image.TransformIndexToPhysicalPoint(index))
    ras = ijk_to_ras @ np.array([*index, 1.0])
    assert np.allclose(ras[:3], lps * np.array([-1, -1, 1]), atol=1e-9)


@pytest.mark.parametrize("flip_x", [False, True], ids=["right-handed", "left-handed"])
def test_volume_loaded_by_slicer_matches_simpleitk_geometry(scene, tmp_path, flip_x):
    image = synthetic_image(seed=3)
    image.SetDirection(oblique_direction(flip_x))
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(image, str(path))
    node = mrml.load_volume_file(scene.volumes_logic, path)
    back = mrml.image_from_volume_node(node)
    assert np.allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-12)
    if not flip_x:
        assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
        assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-9)
        assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    else:
        # Slicer stores a left-handed grid with its slice order reversed (a right-handed IJK-to-RAS): other
        # numbers, the same voxels in space. The adapter reports the node's grid as it is, so the engine's
        # masks land on the node's voxels; check the two grids hold the same values at the same places.
        assert np.linalg.det(np.reshape(back.GetDirection(), (3, 3))) > 0
        on_file_grid = sitk.Resample(back, image, sitk.Transform(), sitk.sitkNearestNeighbor, -2000)
        assert np.array_equal(sitk.GetArrayViewFromImage(on_file_grid), sitk.GetArrayViewFromImage(image))


def test_unusable_nodes_are_explained(scene):
    assert "Select" in mrml.volume_node_problem(None)
    empty = scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    assert "no voxels" in mrml.volume_node_problem(empty)
    labels = scene.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert "not a scalar volume" in mrml.volume_node_problem(labels)
    flat = mrml.volume_node_from_image(sitk.Image(32, 32, 1, sitk.sitkInt16), scene.scene, "flat")
    assert "2D" in mrml.volume_node_problem(flat)
    from COVIDLesionSegLib.errors import InputError

    with pytest.raises(InputError, match="2D"):
        mrml.image_from_volume_node(flat)


# ---------------------------------------------------------------------------------------------------------
# Segments
# ---------------------------------------------------------------------------------------------------------

def test_segments_have_names_colours_terminology_and_input_geometry(scene):
    image = synthetic_image()
    volume = mrml.volume_node_from_image(image, scene.scene, "CT")
    masks = box_masks(sitk.GetArrayViewFromImage(image).shape)
    seg_node = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    ids = mrml.write_segments(seg_node, masks, volume, model_label="hu-lungs 1 + hu-threshold 1")

    assert segment_names(seg_node) == SEGMENT_NAMES
    segmentation = seg_node.GetSegmentation()
    for definition in SEGMENTS:
        segment = segmentation.GetSegment(ids[definition.name])
        assert segment.GetName() == definition.name
        assert np.allclose(segment.GetColor(), definition.color, atol=1e-6)
        assert tag(segment, segment.GetTerminologyEntryTagName()) == definition.terminology_entry()
        assert tag(segment, mrml.GENERATED_TAG) == "hu-lungs 1 + hu-threshold 1"
        assert tag(segment, mrml.FINGERPRINT_TAG) == mrml.segment_fingerprint(segmentation, ids[definition.name])

    # Reference geometry = the input volume's grid, so the Segment Editor edits on the CT's voxels.
    geometry = segmentation.GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    reference = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, reference)
    ref_matrix = vtk.vtkMatrix4x4()
    reference.GetImageToWorldMatrix(ref_matrix)
    assert np.allclose(matrix_array(ref_matrix), mrml.ijk_to_ras_array(volume), atol=1e-9)
    assert reference.GetExtent() == (0, image.GetSize()[0] - 1, 0, image.GetSize()[1] - 1, 0, image.GetSize()[2] - 1)

    # Voxels come back exactly, including the overlap of infection and right lung.
    back = mrml.masks_from_segmentation(seg_node, volume)
    for name, mask in masks.items():
        assert np.array_equal(back[name], mask), name


def test_empty_mask_becomes_an_empty_segment(scene):
    image = synthetic_image()
    volume = mrml.volume_node_from_image(image, scene.scene, "CT")
    masks = box_masks(sitk.GetArrayViewFromImage(image).shape)
    masks["COVID-19 infection"][:] = False
    seg_node = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    mrml.write_segments(seg_node, masks, volume)
    assert segment_names(seg_node) == SEGMENT_NAMES
    assert not mrml.masks_from_segmentation(seg_node, volume)["COVID-19 infection"].any()


def test_masks_on_another_grid_are_refused(scene):
    volume = mrml.volume_node_from_image(synthetic_image(), scene.scene, "CT")
    seg_node = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    with pytest.raises(ValueError, match="input volume's grid"):
        mrml.write_segments(seg_node, {"Right lung": np.ones((3, 3, 3), bool)}, volume)
    with pytest.raises(ValueError, match="no segment definition"):
        mrml.write_segments(seg_node, {"Liver": np.ones((12, 20, 24), bool)}, volume)


def _paint(seg_node, volume, name, index_zyx, value=True):
    """Edit one voxel of a segment the way the Segment Editor does (replace its labelmap)."""
    masks = mrml.masks_from_segmentation(seg_node, volume, [name])
    mask = masks[name]
    mask[index_zyx] = value
    segmentation = seg_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(name)
    image = mrml._oriented_mask(mask.astype(np.uint8), mrml.ijk_to_ras_array(volume))
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, seg_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    return mask


@pytest.fixture
def segmented(scene):
    image = synthetic_image()
    volume = mrml.volume_node_from_image(image, scene.scene, "CT")
    masks = box_masks(sitk.GetArrayViewFromImage(image).shape)
    seg_node = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    mrml.write_segments(seg_node, masks, volume)
    # The user adds a segment of their own, with content.
    user = np.zeros_like(masks["Right lung"])
    user[1:3, 1:4, 1:5] = True
    user_id = seg_node.GetSegmentation().AddEmptySegment("", "My lesion", [0.1, 0.9, 0.1])
    image_data = mrml._oriented_mask(user.astype(np.uint8), mrml.ijk_to_ras_array(volume))
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image_data, seg_node, user_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    return volume, seg_node, masks, user


def _new_masks(masks):
    """A second run's result: every segment shifted by one voxel along x."""
    return {name: np.roll(mask, 1, axis=2) for name, mask in masks.items()}


def test_edit_detection(segmented):
    volume, seg_node, masks, _ = segmented
    assert [s.edited for s in mrml.existing_generated_segments(seg_node)] == [False, False, False]
    _paint(seg_node, volume, "Left lung", (6, 10, 2))
    state = {s.name: s.edited for s in mrml.existing_generated_segments(seg_node)}
    assert state == {"Right lung": False, "Left lung": True, "COVID-19 infection": False}
    # The user's own segment is never reported as ours.
    assert "My lesion" not in state


def test_safe_policy_replaces_unedited_and_keeps_edited_and_user_segments(segmented):
    volume, seg_node, masks, user = segmented
    edited = _paint(seg_node, volume, "Left lung", (6, 10, 2))
    new = _new_masks(masks)
    mrml.write_segments(seg_node, new, volume, policy=None)
    names = segment_names(seg_node)
    assert sorted(names) == sorted(SEGMENT_NAMES + ["My lesion", "Left lung (edited)"])
    back = mrml.masks_from_segmentation(seg_node, volume)
    for name in SEGMENT_NAMES:
        assert np.array_equal(back[name], new[name])
    assert np.array_equal(back["Left lung (edited)"], edited)      # the user's edit survives
    assert np.array_equal(back["My lesion"], user)                  # untouched
    # The kept edited segment now belongs to the user: a later REPLACE run leaves it alone.
    mrml.write_segments(seg_node, masks, volume, policy=True)
    assert sorted(segment_names(seg_node)) == sorted(SEGMENT_NAMES + ["My lesion", "Left lung (edited)"])


def test_replace_policy_discards_edits_of_our_segments_only(segmented):
    volume, seg_node, masks, user = segmented
    _paint(seg_node, volume, "Right lung", (6, 10, 20))
    new = _new_masks(masks)
    mrml.write_segments(seg_node, new, volume, policy=mrml.ReplacePolicy.REPLACE)
    assert sorted(segment_names(seg_node)) == sorted(SEGMENT_NAMES + ["My lesion"])
    back = mrml.masks_from_segmentation(seg_node, volume)
    assert np.array_equal(back["Right lung"], new["Right lung"])
    assert np.array_equal(back["My lesion"], user)


def test_keep_policy_keeps_everything(segmented):
    volume, seg_node, masks, user = segmented
    mrml.write_segments(seg_node, _new_masks(masks), volume, policy=False)
    names = segment_names(seg_node)
    assert sorted(names) == sorted(SEGMENT_NAMES + ["My lesion"] + [f"{n} (previous)" for n in SEGMENT_NAMES])
    back = mrml.masks_from_segmentation(seg_node, volume)
    for name in SEGMENT_NAMES:
        assert np.array_equal(back[f"{name} (previous)"], masks[name])
    # Only the new ones are ours now.
    assert sorted(s.name for s in mrml.existing_generated_segments(seg_node)) == sorted(SEGMENT_NAMES)


def test_bad_policy_is_rejected():
    with pytest.raises(ValueError, match="replaceExisting"):
        mrml.ReplacePolicy.from_argument("sometimes")


# ---------------------------------------------------------------------------------------------------------
# Subject hierarchy, table, terminology
# ---------------------------------------------------------------------------------------------------------

def test_results_go_under_the_input_study_and_transform(scene):
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene.scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "Chest CT study")
    volume = mrml.volume_node_from_image(synthetic_image(), scene.scene, "CT")
    sh.CreateItem(study, volume)
    transform = scene.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    volume.SetAndObserveTransformNodeID(transform.GetID())

    seg_node = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    table = scene.scene.AddNewNodeByClass("vtkMRMLTableNode", "table")
    for node in (seg_node, table):
        item = mrml.place_beside(node, volume)
        assert sh.GetItemParent(item) == study
    assert seg_node.GetTransformNodeID() == transform.GetID()


def _quantities():
    lungs = np.zeros((20, 30, 40), np.uint8)
    lungs[2:18, 5:25, 3:18] = 1
    lungs[2:18, 5:25, 22:37] = 2
    infection = np.zeros(lungs.shape, bool)
    infection[10:14, 8:12, 5:9] = True
    return quantify.quantify(lungs, infection, (2.0, 0.8, 0.8))


def test_table_holds_the_quantification(scene, tmp_path):
    quantities = _quantities()
    table = scene.scene.AddNewNodeByClass("vtkMRMLTableNode", "results")
    mrml.fill_table(table, quantities)
    rows = mrml.table_as_dicts(table)
    assert [r[mrml.REGION_COLUMN] for r in rows] == [label for label, _, _ in mrml.TABLE_ROWS]
    for row, (_, side, zone) in zip(rows, mrml.TABLE_ROWS, strict=True):
        entry = quantities[quantify.REPORT_KEYS[side]]
        if zone:
            entry = entry["zones"][zone]
        for title, key, _unit in mrml.TABLE_COLUMNS:
            expected = entry.get(key)     # no zone score on the halves, no high opacity without HU
            assert (math.isnan(row[title]) if expected is None else row[title] == pytest.approx(expected, abs=1e-9))
    assert table.GetColumnUnitLabel("Lung volume") == "mL"
    assert rows[0]["Infected"] > 0 and math.isnan(rows[1]["Infected"]) is False

    path = mrml.write_table_csv(table, tmp_path / "results.csv")
    with open(path, newline="", encoding="utf-8") as fh:
        exported = list(csv.reader(fh))
    assert exported[0] == ["Region", "Lung volume (mL)", "Infection volume (mL)", "Infected (%)", "High opacity (%)",
                           "Zone score (points)"]
    assert rows[0]["Zone score"] == quantities["right_lung"]["zone_score"]
    assert len(exported) == len(mrml.TABLE_ROWS) + 1
    both = quantities[quantify.REPORT_KEYS["both"]]
    assert float(exported[3][1]) == pytest.approx(both["volume_ml"])


def test_lungs_only_table_leaves_infection_empty(scene):
    quantities = dict(_quantities(), infection_segmented=False)
    table = scene.scene.AddNewNodeByClass("vtkMRMLTableNode", "results")
    mrml.fill_table(table, quantities)
    for row in mrml.table_as_dicts(table):
        assert row["Lung volume"] > 0 or "zone" in row[mrml.REGION_COLUMN]
        assert math.isnan(row["Infection volume"]) and math.isnan(row["Infected"]) and math.isnan(row["Zone score"])


def test_terminology_file_gives_the_segments_codes_and_colours():
    """Our .term.json loads in Slicer's terminology logic; each segment's label finds its codes and colour."""
    holder = mrml.create_standalone_scene(with_terminologies=True)
    logic = holder.terminologies_logic
    context = mrml.load_terminology(logic, TERMINOLOGY_FILE)
    assert mrml.load_terminology(logic, TERMINOLOGY_FILE) == context  # loading twice is harmless
    for definition in SEGMENTS:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.FindTypeInTerminologyBy3dSlicerLabel(context, definition.slicer_label, entry), definition.name
        assert entry.GetCategoryObject().GetCodeValue() == definition.category.value
        assert entry.GetTypeObject().GetCodeValue() == definition.type.value
        modifier = entry.GetTypeModifierObject()
        assert modifier.GetCodeValue() == definition.type_modifier.value
        assert tuple(modifier.GetRecommendedDisplayRGBValue()) == definition.color_rgb255
        parsed = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(definition.terminology_entry(), parsed)
        assert parsed.GetTypeModifierObject().GetCodeValue() == definition.type_modifier.value
    holder.scene.Clear(1)


def test_optional_3d_surfaces(scene):
    image = synthetic_image()
    volume = mrml.volume_node_from_image(image, scene.scene, "CT")
    seg_node = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    mrml.write_segments(seg_node, box_masks(sitk.GetArrayViewFromImage(image).shape), volume)
    surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    mrml.show_segmentation(seg_node, surfaces=False)
    assert seg_node.GetDisplayNode() is not None
    assert not seg_node.GetSegmentation().ContainsRepresentation(surface)
    mrml.show_segmentation(seg_node, surfaces=True)
    assert seg_node.GetSegmentation().ContainsRepresentation(surface)
    polydata = seg_node.GetSegmentation().GetSegment("right_lung").GetRepresentation(surface)
    assert polydata.GetNumberOfPoints() > 0
