"""MRML adapter: Slicer volume nodes in, segmentation and table nodes out (Slicer and slicer-core).

This is the only part of the engine that knows about MRML. It imports ``slicer`` (the MRML classes of the
desktop application or of the ``slicer-core`` wheel) and ``vtk`` lazily, never Qt, so it runs inside
Slicer, in a ``PythonSlicer`` script and in plain Python with ``pip install slicer-core``.

Geometry: a volume node stores its grid as IJK-to-RAS (spacing, origin and direction cosines in RAS);
SimpleITK and the engine use LPS. The conversion flips the first two physical axes
(``LPS = diag(-1, -1, 1) RAS``) of the origin and of every direction column, and copies the spacing as is,
so the engine sees exactly the grid Slicer shows (checked against ``vtkSlicerVolumesLogic`` loading the
same file, and round-tripped bit for bit in the tests). A parent transform of the input volume is not
applied to the voxels: the segmentation is placed under the same transform, which keeps the two aligned
for linear and non-linear transforms alike.

Segments written by this module carry the segment tag :data:`GENERATED_TAG` (value: model id and version)
and :data:`FINGERPRINT_TAG` (a digest of the mask as written). A re-run can therefore tell (1) the user's
own segments (no tag), which are never touched, (2) this module's segments as they were produced, which
can be replaced, and (3) this module's segments that the user edited since (the digest no longer matches),
which are replaced only with explicit consent (:class:`ReplacePolicy`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .segments import SEGMENTS, TERMINOLOGY_FILE, SegmentDef

#: Segment tag that marks a segment as produced by this module (value: "<model id> <version>").
GENERATED_TAG = "COVIDLesionSeg.Generated"
#: Segment tag holding a digest of the segment's voxels as written, to detect later manual edits.
FINGERPRINT_TAG = "COVIDLesionSeg.Fingerprint"
#: Node attribute set on tables made by this module (value: the input volume's node ID).
TABLE_ATTRIBUTE = "COVIDLesionSeg.Results"

_LPS_FROM_RAS = np.array([-1.0, -1.0, 1.0])


def _slicer():
    import slicer  # MRML classes: the desktop application's or the slicer-core wheel's

    return slicer


def _vtk_numpy():
    from vtkmodules.util import numpy_support

    return numpy_support


# ------------------------------------------------------------------------------------------------------------
# Volume node <-> SimpleITK image
# ------------------------------------------------------------------------------------------------------------

def volume_node_problem(volume_node) -> Optional[str]:
    """Why ``volume_node`` cannot be segmented (a sentence for the user), or None when it can.

    Only structural checks that cost nothing (the widget calls this whenever the selection changes); the
    Hounsfield-unit checks of :func:`~COVIDLesionSegLib.checks.check_ct` run when segmentation starts.
    """
    if volume_node is None:
        return "Select an input CT volume."
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        return (f"'{volume_node.GetName()}' is not a scalar volume (it is a {volume_node.GetClassName()}); "
                "select a CT volume.")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return f"'{volume_node.GetName()}' has no voxels loaded."
    if image.GetNumberOfScalarComponents() != 1:
        return (f"'{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel "
                "(a colour or vector image); a CT has one.")
    dims = image.GetDimensions()
    if min(dims) <= 1:
        return f"'{volume_node.GetName()}' is a 2D image ({dims[0]} x {dims[1]} x {dims[2]}); a 3D CT is needed."
    return None


def geometry_lps_from_node(volume_node) -> tuple[tuple[float, float, float], tuple[float, float, float],
                                                  tuple[float, ...]]:
    """(spacing, origin, direction) of a volume node in ITK/LPS terms (direction row-major 3x3)."""
    vtk = _vtk()
    spacing = tuple(float(s) for s in volume_node.GetSpacing())
    origin_ras = np.asarray(volume_node.GetOrigin(), dtype=float)
    directions = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(directions)
    ras = np.array([[directions.GetElement(r, c) for c in range(3)] for r in range(3)])
    lps = _LPS_FROM_RAS[:, None] * ras  # flip the R and A rows: columns become LPS direction cosines
    origin = tuple(float(v) for v in _LPS_FROM_RAS * origin_ras)
    return spacing, origin, tuple(float(v) for v in lps.ravel())


def image_from_volume_node(volume_node) -> sitk.Image:
    """The node's voxels as a SimpleITK image with the same grid in LPS (a copy; the node is not changed).

    Raises:
        InputError: the node cannot be segmented (see :func:`volume_node_problem`).
    """
    from .errors import InputError

    problem = volume_node_problem(volume_node)
    if problem:
        raise InputError(problem)
    image_data = volume_node.GetImageData()
    dims = image_data.GetDimensions()
    scalars = _vtk_numpy().vtk_to_numpy(image_data.GetPointData().GetScalars())
    array = np.array(scalars.reshape(dims[2], dims[1], dims[0]), copy=True)  # (k, j, i) = (z, y, x)
    image = sitk.GetImageFromArray(array)
    spacing, origin, direction = geometry_lps_from_node(volume_node)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def volume_node_from_image(image: sitk.Image, scene, name: str = "CT", volume_node=None):
    """Put a SimpleITK image (LPS) into a new (or the given) ``vtkMRMLScalarVolumeNode`` with the same grid.

    Used by the batch runner under plain Python, where DICOM series are read with the engine's reader.
    """
    vtk = _vtk()
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("only 3D single-component images can become scalar volume nodes")
    array = sitk.GetArrayFromImage(image)
    if volume_node is None:
        volume_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(image.GetSize())
    vtk_array = _vtk_numpy().numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    image_data.GetPointData().SetScalars(vtk_array)
    volume_node.SetAndObserveImageData(image_data)
    volume_node.SetSpacing(image.GetSpacing())
    volume_node.SetOrigin(tuple(float(v) for v in _LPS_FROM_RAS * np.asarray(image.GetOrigin())))
    lps = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    ras = _LPS_FROM_RAS[:, None] * lps
    volume_node.SetIJKToRASDirections([[float(v) for v in row] for row in ras])
    volume_node.CreateDefaultDisplayNodes()
    if volume_node.GetDisplayNode() is not None:
        display = volume_node.GetDisplayNode()
        color_id = "vtkMRMLColorTableNodeGrey"
        if scene.GetNodeByID(color_id) is not None:
            display.SetAndObserveColorNodeID(color_id)
        display.AutoWindowLevelOff()
        display.SetWindowLevel(1500, -600)  # lung window: what a chest CT reader expects first
    return volume_node


def ijk_to_ras_array(volume_node) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a volume node as a numpy array."""
    vtk = _vtk()
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk():
    import vtk

    return vtk


# ------------------------------------------------------------------------------------------------------------
# Segments
# ------------------------------------------------------------------------------------------------------------

class ReplacePolicy:
    """What a re-run does with this module's segments already in the output segmentation.

    The user's own segments (no :data:`GENERATED_TAG`) are never removed or changed, whatever the policy.

    - ``REPLACE``: remove every segment this module made before (including ones the user edited since), then add
      the new ones. The GUI passes this only after the user agreed.
    - ``KEEP``: keep the earlier segments, renamed "<name> (previous)" and untagged (they become the user's
      segments), and add the new ones beside them.
    - ``SAFE`` (default of the logic): replace unedited earlier segments; keep edited ones, renamed
      "<name> (edited)" and untagged, so no manual work is lost without consent.
    """

    REPLACE = "replace"
    KEEP = "keep"
    SAFE = "safe"

    @classmethod
    def from_argument(cls, value) -> str:
        """Map the logic's ``replaceExisting`` argument: True -> REPLACE, False -> KEEP, None -> SAFE."""
        if value is True:
            return cls.REPLACE
        if value is False:
            return cls.KEEP
        if value is None:
            return cls.SAFE
        if value in (cls.REPLACE, cls.KEEP, cls.SAFE):
            return value
        raise ValueError(f"replaceExisting must be True, False, None or one of 'replace', 'keep', 'safe'; "
                         f"got {value!r}")


@dataclass(frozen=True)
class ExistingSegment:
    """A segment of the output segmentation that this module produced earlier."""

    segment_id: str
    name: str
    edited: bool   # its voxels changed since this module wrote them


def _binary_labelmap_name() -> str:
    return _slicer().vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


def _segment_voxels(segmentation, segment_id: str) -> tuple[Optional[np.ndarray], tuple[int, int, int]]:
    """(mask cropped to its bounding box, bounding box start (i, j, k) in the labelmap's IJK) of a segment.

    The segment's own label value is extracted from its (possibly shared) labelmap layer. Returns
    (None, (0, 0, 0)) for an empty segment.
    """
    segment = segmentation.GetSegment(segment_id)
    labelmap = segment.GetRepresentation(_binary_labelmap_name()) if segment is not None else None
    if labelmap is None or labelmap.GetPointData() is None or labelmap.GetPointData().GetScalars() is None:
        return None, (0, 0, 0)
    extent = labelmap.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return None, (0, 0, 0)
    dims = (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1)
    values = _vtk_numpy().vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    mask = values == segment.GetLabelValue()
    if not mask.any():
        return None, (0, 0, 0)
    bounds = []
    for axis in (0, 1, 2):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        bounds.append((int(hit[0]), int(hit[-1]) + 1))
    crop = mask[bounds[0][0]:bounds[0][1], bounds[1][0]:bounds[1][1], bounds[2][0]:bounds[2][1]]
    start = (extent[0] + bounds[2][0], extent[2] + bounds[1][0], extent[4] + bounds[0][0])
    return crop, start


def segment_fingerprint(segmentation, segment_id: str) -> str:
    """Digest of a segment's voxels (positions and values), independent of how Slicer stores or pads them.

    The digest covers the bounding box start in IJK, its size and the packed bits inside it, so it
    changes with any paint, erase or island operation, and not when Slicer merely re-crops, pads or moves
    the segment to another shared labelmap layer.
    """
    crop, start = _segment_voxels(segmentation, segment_id)
    digest = hashlib.sha256()
    if crop is None:
        digest.update(b"empty")
    else:
        digest.update(np.asarray(start + crop.shape, dtype=np.int64).tobytes())
        digest.update(np.packbits(crop).tobytes())
    return digest.hexdigest()[:32]


def existing_generated_segments(segmentation_node) -> list[ExistingSegment]:
    """This module's segments in a segmentation node, each with whether the user edited it since."""
    if segmentation_node is None:
        return []
    segmentation = segmentation_node.GetSegmentation()
    found = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        generated = _get_tag(segment, GENERATED_TAG)
        if generated is None:
            continue
        recorded = _get_tag(segment, FINGERPRINT_TAG)
        edited = recorded is None or recorded != segment_fingerprint(segmentation, segment_id)
        found.append(ExistingSegment(segment_id, segment.GetName(), edited))
    return found


def _get_tag(segment, tag: str) -> Optional[str]:
    value = _vtk().reference("")
    if not segment.GetTag(tag, value):
        return None
    return str(value.get())


def _oriented_mask(mask_zyx: np.ndarray, ijk_to_ras: np.ndarray):
    """A ``vtkOrientedImageData`` holding ``mask`` (uint8 0/1) cropped to its bounding box, on the input grid."""
    slicer = _slicer()
    vtk = _vtk()
    image = slicer.vtkOrientedImageData()
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijk_to_ras[r, c]))
    image.SetImageToWorldMatrix(matrix)
    bounds = []
    for axis in (0, 1, 2):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask_zyx.any(axis=others))
        bounds.append((int(hit[0]), int(hit[-1])))
    (k0, k1), (j0, j1), (i0, i1) = bounds
    image.SetExtent(i0, i1, j0, j1, k0, k1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    view = _vtk_numpy().vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k1 - k0 + 1, j1 - j0 + 1,
                                                                                i1 - i0 + 1)
    view[...] = mask_zyx[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1]
    image.Modified()
    return image


def _unique_name(segmentation, wanted: str, own_id: str | None = None) -> str:
    """``wanted``, or ``wanted 2``, ``wanted 3``... so that no other segment (than ``own_id``) has that name."""
    names = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())
             if segmentation.GetNthSegmentID(i) != own_id}
    if wanted not in names:
        return wanted
    k = 2
    while f"{wanted} {k}" in names:
        k += 1
    return f"{wanted} {k}"


def _retire_segment(segmentation, segment_id: str, suffix: str) -> None:
    """Turn one of our earlier segments into a user segment: renamed, without our tags (kept, never removed)."""
    segment = segmentation.GetSegment(segment_id)
    segment.RemoveTag(GENERATED_TAG)
    segment.RemoveTag(FINGERPRINT_TAG)
    segment.SetName(_unique_name(segmentation, f"{segment.GetName()} {suffix}"))


def write_segments(segmentation_node, masks: Mapping[str, np.ndarray], reference_volume_node,
                   policy: str = ReplacePolicy.SAFE, model_label: str = "",
                   segment_defs: Sequence[SegmentDef] = SEGMENTS) -> dict[str, str]:
    """Put result masks into a segmentation node as named, coloured, terminology-tagged segments.

    Args:
        segmentation_node: the output ``vtkMRMLSegmentationNode`` (may already hold segments).
        masks: segment name -> boolean (z, y, x) array on the reference volume's voxel grid.
        reference_volume_node: the input CT; its grid becomes the segmentation's reference geometry.
        policy: what happens to this module's earlier segments (:class:`ReplacePolicy`).
        model_label: value of the :data:`GENERATED_TAG` tag (model id and version), for provenance.
        segment_defs: the segment definitions to look names up in (name, colour, ID, terminology).

    Returns:
        segment name -> segment ID of the new segments.
    """
    policy = ReplacePolicy.from_argument(policy)
    defs = {d.name: d for d in segment_defs}
    unknown = [name for name in masks if name not in defs]
    if unknown:
        raise ValueError(f"no segment definition for {unknown}; defined: {sorted(defs)}")
    dims = reference_volume_node.GetImageData().GetDimensions()
    expected = (dims[2], dims[1], dims[0])
    for name, mask in masks.items():
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask {name!r} has shape {mask.shape} (z, y, x), but the reference volume has "
                             f"{expected}; masks must be on the input volume's grid")

    segmentation = segmentation_node.GetSegmentation()
    was_modifying = segmentation_node.StartModify()
    try:
        for earlier in existing_generated_segments(segmentation_node):
            if policy == ReplacePolicy.REPLACE or (policy == ReplacePolicy.SAFE and not earlier.edited):
                segmentation.RemoveSegment(earlier.segment_id)
            elif policy == ReplacePolicy.KEEP:
                _retire_segment(segmentation, earlier.segment_id, "(previous)")
            else:
                _retire_segment(segmentation, earlier.segment_id, "(edited)")

        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        ijk_to_ras = ijk_to_ras_array(reference_volume_node)
        created: dict[str, str] = {}
        for name, mask in masks.items():
            definition = defs[name]
            segment_id = definition.id if segmentation.GetSegment(definition.id) is None else ""
            color = list(definition.color)
            mask = np.asarray(mask, dtype=bool)
            if mask.any():
                new_id = segmentation_node.AddSegmentFromBinaryLabelmapRepresentation(
                    _oriented_mask(mask.astype(np.uint8), ijk_to_ras), definition.name, color, segment_id)
            else:
                new_id = segmentation.AddEmptySegment(segment_id, definition.name, color)
            if not new_id:
                raise RuntimeError(f"Slicer refused to add the segment {definition.name!r}")
            segment = segmentation.GetSegment(new_id)
            segment.SetName(_unique_name(segmentation, definition.name, own_id=new_id))
            segment.SetTag(segment.GetTerminologyEntryTagName(), definition.terminology_entry())
            segment.SetTag(GENERATED_TAG, model_label or "COVIDLesionSeg")
            segment.SetTag(FINGERPRINT_TAG, segment_fingerprint(segmentation, new_id))
            segment.SetNameAutoGenerated(False)
            segment.SetColorAutoGenerated(False)
            created[name] = new_id
    finally:
        segmentation_node.EndModify(was_modifying)
    return created


def masks_from_segmentation(segmentation_node, reference_volume_node,
                            names: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
    """Segment name -> bool (z, y, x) mask on the reference volume's grid (for tests and exports).

    Segments on another grid than the reference volume are not resampled: a ValueError says so.
    """
    segmentation = segmentation_node.GetSegmentation()
    dims = reference_volume_node.GetImageData().GetDimensions()
    reference = ijk_to_ras_array(reference_volume_node)
    wanted = set(names) if names is not None else None
    out: dict[str, np.ndarray] = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        if wanted is not None and segment.GetName() not in wanted:
            continue
        mask = np.zeros((dims[2], dims[1], dims[0]), dtype=bool)
        labelmap = segment.GetRepresentation(_binary_labelmap_name())
        if labelmap is not None:
            matrix = _vtk().vtkMatrix4x4()
            labelmap.GetImageToWorldMatrix(matrix)
            own = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
            if not np.allclose(own, reference, atol=1e-6):
                raise ValueError(f"segment {segment.GetName()!r} is not on the reference volume's grid")
        crop, start = _segment_voxels(segmentation, segment_id)
        if crop is not None:
            i0, j0, k0 = start
            mask[k0:k0 + crop.shape[0], j0:j0 + crop.shape[1], i0:i0 + crop.shape[2]] = crop
        out[segment.GetName()] = mask
    return out


# ------------------------------------------------------------------------------------------------------------
# Subject hierarchy, display, terminology
# ------------------------------------------------------------------------------------------------------------

def place_beside(node, input_volume_node) -> int:
    """Parent ``node`` in Subject Hierarchy under the input volume's parent (its study for DICOM data).

    Also puts the node under the input volume's parent transform, so results stay aligned with the CT.
    Creates the hierarchy items when they do not exist yet (slicer-core does not create them on its own).
    Returns the item ID of ``node``.
    """
    slicer = _slicer()
    scene = node.GetScene()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    volume_item = sh.GetItemByDataNode(input_volume_node)
    if not volume_item:
        volume_item = sh.CreateItem(sh.GetSceneItemID(), input_volume_node)
    parent = sh.GetItemParent(volume_item) or sh.GetSceneItemID()
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(parent, node)
    elif sh.GetItemParent(item) != parent:
        sh.SetItemParent(item, parent)
    if node.IsA("vtkMRMLTransformableNode"):
        node.SetAndObserveTransformNodeID(input_volume_node.GetTransformNodeID())
    return item


def show_segmentation(segmentation_node, surfaces: bool = False) -> None:
    """Create display nodes; with ``surfaces`` also the closed-surface (3D) representation."""
    segmentation_node.CreateDefaultDisplayNodes()
    if surfaces:
        segmentation_node.CreateClosedSurfaceRepresentation()
    else:
        segmentation_node.RemoveClosedSurfaceRepresentation()


def load_terminology(terminologies_logic, path: Path = TERMINOLOGY_FILE) -> str:
    """Load the project's ``.term.json`` into Slicer's terminology logic (once); returns its context name."""
    import json

    context = json.loads(Path(path).read_text())["SegmentationCategoryTypeContextName"]
    if terminologies_logic is None:
        return context
    vtk = _vtk()
    loaded = vtk.vtkStringArray()
    terminologies_logic.GetLoadedTerminologyNames(loaded)
    if context not in {loaded.GetValue(i) for i in range(loaded.GetNumberOfValues())}:
        if not terminologies_logic.LoadTerminologyFromFile(str(path)):
            raise RuntimeError(f"Slicer could not load the terminology file {path}")
    return context


# ------------------------------------------------------------------------------------------------------------
# Quantification table
# ------------------------------------------------------------------------------------------------------------

#: Rows of the results table: (label, side, zone or None), in display order. Sides and zones are the
#: quantification's (``quantify.py``): "right", "left", "both"; "upper", "middle", "lower", "ventral", "dorsal".
TABLE_ROWS: tuple[tuple[str, str, Optional[str]], ...] = (
    ("Right lung", "right", None),
    ("Left lung", "left", None),
    ("Both lungs", "both", None),
    *((f"{side_label} - {zone}", side, zone)
      for side, side_label in (("right", "Right lung"), ("left", "Left lung"), ("both", "Both lungs"))
      for zone in ("upper", "middle", "lower", "ventral", "dorsal")),
)

#: Columns of the results table: (title, key in a quantification entry, unit).
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("Lung volume", "volume_ml", "mL"),
    ("Infection volume", "infection_ml", "mL"),
    ("Infected", "infected_percent", "%"),
    # Severity (quantify.py): the high-opacity share (Chaganti et al. 2020) and the six-zone score (Wu et al.
    # 2020) of each lung (0-12), both lungs (0-24) and each third (0-4); other rows have no score (NaN).
    ("High opacity", "high_opacity_percent", "%"),
    ("Zone score", "zone_score", "points"),
)
REGION_COLUMN = "Region"


def quantity_entry(quantities: Mapping[str, Any], side: str, zone: Optional[str] = None) -> Mapping[str, Any]:
    """The quantification entry of a lung ("right", "left", "both") or of one of its zones."""
    from .quantify import REPORT_KEYS

    entry = quantities[REPORT_KEYS[side]]
    return entry["zones"][zone] if zone else entry


def table_rows(quantities: Mapping[str, Any]) -> list[tuple[str, list[float]]]:
    """(region label, [values of TABLE_COLUMNS]) per row; NaN where a value is undefined or not measured.

    With ``lungs only`` (``quantities["infection_segmented"] is False``) the infection columns are NaN
    rather than 0: no infection was looked for.
    """
    infection_measured = quantities.get("infection_segmented", True) is not False
    rows = []
    for label, side, zone in TABLE_ROWS:
        entry = quantity_entry(quantities, side, zone)
        values = []
        for _, key, _ in TABLE_COLUMNS:
            value = entry.get(key)
            if key != "volume_ml" and not infection_measured:
                value = None
            values.append(float("nan") if value is None else float(value))
        rows.append((label, values))
    return rows


def fill_table(table_node, quantities: Mapping[str, Any], input_volume_node=None) -> None:
    """Write the quantification into a ``vtkMRMLTableNode`` (one row per region, see :data:`TABLE_ROWS`)."""
    vtk = _vtk()
    rows = table_rows(quantities)
    was_modifying = table_node.StartModify()
    try:
        table_node.RemoveAllColumns()
        table = table_node.GetTable()
        region = vtk.vtkStringArray()
        region.SetName(REGION_COLUMN)
        columns = []
        for title, _, _ in TABLE_COLUMNS:
            column = vtk.vtkDoubleArray()
            column.SetName(title)
            columns.append(column)
        for label, values in rows:
            region.InsertNextValue(label)
            for column, value in zip(columns, values, strict=True):
                column.InsertNextValue(value)
        table.AddColumn(region)
        for column in columns:
            table.AddColumn(column)
        for title, key, unit in TABLE_COLUMNS:
            table_node.SetColumnUnitLabel(title, unit)
            table_node.SetColumnProperty(title, "componentNames", key)
        table_node.SetUseColumnTitleAsColumnHeader(True)
        table_node.SetLocked(True)  # results, not a form: editing the numbers would make them lie
        if input_volume_node is not None:
            table_node.SetAttribute(TABLE_ATTRIBUTE, input_volume_node.GetID() or "")
        table.Modified()
    finally:
        table_node.EndModify(was_modifying)


def table_as_dicts(table_node) -> list[dict[str, Any]]:
    """The table's rows as dicts (column name -> value; NaN for empty numbers), for tests and CSV export."""
    table = table_node.GetTable()
    names = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c, name in enumerate(names):
            column = table.GetColumn(c)
            if column.IsA("vtkStringArray"):
                row[name] = column.GetValue(r)
            else:
                row[name] = float(column.GetValue(r))
        rows.append(row)
    return rows


def write_table_csv(table_node, path: str | Path) -> Path:
    """Export the results table as CSV (UTF-8; units in the header; empty cells for undefined values)."""
    import csv
    import io

    from .outputs import atomic_write_text

    units = {title: unit for title, _, unit in TABLE_COLUMNS}
    rows = table_as_dicts(table_node)
    names = list(rows[0]) if rows else [REGION_COLUMN] + [t for t, _, _ in TABLE_COLUMNS]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([f"{n} ({units[n]})" if n in units else n for n in names])
    for row in rows:
        writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row.values()])
    return atomic_write_text(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------------------
# A scene outside the desktop application (batch runner under plain Python, tests)
# ------------------------------------------------------------------------------------------------------------

@dataclass
class StandaloneScene:
    """An MRML scene with the module logics the adapter needs, without the Slicer application.

    Keeps Python references to every logic: a logic that is garbage-collected while registered leaves the
    application logic with a dangling pointer (colour errors, crashes).
    """

    scene: Any
    app_logic: Any
    logics: dict[str, Any] = field(default_factory=dict)

    @property
    def volumes_logic(self):
        return self.logics["Volumes"]

    @property
    def segmentations_logic(self):
        return self.logics["Segmentations"]

    @property
    def terminologies_logic(self):
        return self.logics.get("Terminologies")


def create_standalone_scene(with_terminologies: bool = True) -> StandaloneScene:
    """Make a ``vtkMRMLScene`` and register the colours, volumes, segmentations, subject hierarchy, tables
    (and terminologies) logics, as the Slicer application does at start-up."""
    slicer = _slicer()
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    holder = StandaloneScene(scene, app_logic)
    classes = [("Colors", slicer.vtkSlicerColorLogic), ("Volumes", slicer.vtkSlicerVolumesLogic),
               ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
               ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
               ("Tables", slicer.vtkSlicerTablesLogic)]
    if with_terminologies:
        classes.append(("Terminologies", slicer.vtkSlicerTerminologiesModuleLogic))
    for name, cls in classes:
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        if name == "Colors":
            app_logic.SetColorLogic(logic)
            _set_scene_quietly(logic, scene)
        else:
            logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name, logic)
        holder.logics[name] = logic
    return holder


def _set_scene_quietly(colors_logic, scene) -> None:
    """Give the colours logic its scene without its "FindDefaultColorFiles failed: HomeDirectory is not set"
    error. Why silenced rather than fixed: that search looks for the Slicer application's ``share/ColorFiles``,
    which slicer-core does not ship, so outside the application it can only fail (with a home directory set
    it fails as "Cannot open directory" instead); the colour tables the logic builds in code, the ones
    segmentations and labelmaps use, are created all the same. Only this call is silenced."""
    vtk = _vtk()
    shown = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        colors_logic.SetMRMLScene(scene)
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(shown)


def save_segmentation(segmentation_node, path: str | Path) -> Path:
    """Write a ``.seg.nrrd`` with Slicer's segmentation storage node (atomic and read back before the rename);
    ``batch.py`` and the web app save their results with it."""
    from .errors import OutputError
    from .outputs import atomic_write, verify_nrrd

    path = Path(path)

    def write(tmp: Path) -> None:
        storage = _slicer().vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(tmp))
        storage.SetUseCompression(1)
        if not storage.WriteData(segmentation_node):
            raise OutputError(f"{path}: Slicer could not write the segmentation (disk full or folder not writable?)")

    return atomic_write(path, write, verify_nrrd)


def load_volume_file(volumes_logic, path: str | Path, name: Optional[str] = None):
    """Load a NIfTI/NRRD/MHA file as a scalar volume node with ``vtkSlicerVolumesLogic`` (exact geometry).

    Raises:
        InputError: the file is missing or cannot be read as a volume.
    """
    from .errors import InputError
    from .io import case_name

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    node = volumes_logic.AddArchetypeVolume(str(path), name or case_name(path))
    if node is None:
        raise InputError(f"{path}: Slicer cannot read this file as a volume (damaged or not an image)")
    return node
