"""DICOM SEG and DICOM SR (TID 1500 measurement report) of a case whose input was a DICOM series.

Written with highdicom (Herrmann et al., "Highdicom: a Python Library for Standardized Encoding of Image
Annotations and Machine Learning Model Outputs in Pathology and Radiology", J Digit Imaging 2022), so that a
PACS can file the result beside the scan it came from.

**SEG** (Segmentation IOD, DICOM PS3.3 A.51): one BINARY segmentation with the three segments of
``segments.py`` (1 right lung, 2 left lung, 3 COVID-19 infection; the infection overlaps the lungs, which a
binary segmentation allows), each coded with the same SNOMED CT terms as the Slicer terminology
(``Resources/COVIDLesionSeg.term.json``): category and type, the laterality as the type modifier (nested in the
type item, as PS3.3 C.8.20.2 lays out the Segment Description macro), the infection's anatomic region, the
terminology colour as recommended display CIELab value, and the model that made it as algorithm
identification (automatic; family "Artificial Intelligence" for networks, "Histogram Analysis" for the
Hounsfield-unit methods). Frames are the source's own slices: frame k of the SEG is the mask on source image
``k`` and references it (highdicom takes each frame's position and orientation from its source image, so the
SEG is in the source's exact geometry, also for a gantry-tilted series). Empty frames are left out, as
highdicom does by default; reading the SEG back gives empty masks on them.

**SR** (Comprehensive 3D SR, TID 1500 "Measurement Report"): the device observer (this software), the
procedure (LOINC 25045-6 "CT unspecified body region"), and

- one TID 1411 volumetric group per SEG segment, referencing that segment: the volume in mL, and for each
  lung its percentage of opacity, percentage of high opacity and its zone score (0-12);
- one TID 1501 group for both lungs: percentage of opacity, of high opacity, the six-zone score (0-24) and
  each zone's points.

Volume is SCT 118565006; the other measures have no standard code and use this project's private coding
scheme :data:`SCHEME` (a designator starting with "99", PS3.3 8.2), described in the SR's Coding Scheme
Identification Sequence. Each measurement carries the model id and version as its algorithm identification.
Undefined numbers (an empty lung's percentages) are left out rather than written as 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from . import __version__
from .errors import CovidLesionSegError
from .segments import SEGMENTS, Code, SegmentDef
from .volume import Geometry

#: Private coding scheme of the measures without a standard code (PS3.3 8.2: "99" prefix).
SCHEME = "99COVIDLESIONSEG"
SCHEME_NAME = "COVIDLesionSeg lung infection measures"
SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 9801, 9802
MANUFACTURER = "COVIDLesionSeg"
#: Tolerances when matching source images to the voxel grid (mm, and direction cosines).
_POSITION_TOL, _DIRECTION_TOL = 0.01, 1e-4


class DicomExportError(CovidLesionSegError):
    """The result cannot be written as DICOM SEG/SR in the source's geometry (the message says why)."""


def _hd():
    try:
        import highdicom
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise DicomExportError("DICOM SEG/SR need the highdicom package (pip install highdicom)") from exc
    return highdicom


def _coded(code: Code):
    return _hd().sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _local(value: str, meaning: str):
    return _hd().sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


def read_sources(files: Sequence[str | Path]):
    """The source images' headers (pydicom datasets without pixel data)."""
    import pydicom

    try:
        return [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    except Exception as exc:  # noqa: BLE001 - pydicom raises several kinds
        raise DicomExportError(f"the source DICOM files could not be read again ({exc})") from None


def frame_indices(datasets: Sequence[Any], geometry: Geometry) -> list[int]:
    """Slice index k of the grid ``geometry`` for each source image, found from its position.

    Each image must have the grid's in-plane orientation, size and pixel spacing, and lie on one of its
    slices (its position projected on the slice normal is a whole number of slice steps from the origin;
    a shift within the plane, which a gantry tilt gives, is allowed). Every slice must have exactly one
    image: a resampled or cropped grid cannot be written in the source's geometry.
    """
    direction = np.asarray(geometry.direction, float).reshape(3, 3)   # columns: the i, j, k axis directions
    origin, spacing = np.asarray(geometry.origin, float), np.asarray(geometry.spacing, float)
    size = tuple(int(s) for s in geometry.size)
    indices = []
    for ds in datasets:
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            raise DicomExportError("the source is a multi-frame image; only single-frame series are supported")
        iop = np.asarray(ds.ImageOrientationPatient, float)
        if not (np.allclose(iop[:3], direction[:, 0], atol=_DIRECTION_TOL)
                and np.allclose(iop[3:], direction[:, 1], atol=_DIRECTION_TOL)):
            raise DicomExportError(f"source image {ds.SOPInstanceUID} is not oriented like the segmented volume")
        rows, cols = int(ds.Rows), int(ds.Columns)
        pixel = [float(v) for v in ds.PixelSpacing]   # (between rows, between columns) = (y, x)
        if (cols, rows) != size[:2] or not np.allclose(pixel[::-1], spacing[:2], atol=1e-6):
            raise DicomExportError(f"source image {ds.SOPInstanceUID} has another size or pixel spacing than the "
                                   "segmented volume")
        along = float((np.asarray(ds.ImagePositionPatient, float) - origin) @ direction[:, 2]) / spacing[2]
        k = int(round(along))
        if abs(along - k) * spacing[2] > _POSITION_TOL or not 0 <= k < size[2]:
            raise DicomExportError(f"source image {ds.SOPInstanceUID} does not lie on a slice of the segmented "
                                   "volume (resampled or cropped?)")
        indices.append(k)
    if sorted(indices) != list(range(size[2])):
        raise DicomExportError(f"the {len(datasets)} source images do not match the volume's {size[2]} slices one "
                               "to one (missing, duplicated or interpolated slices)")
    return indices


def _algorithm(model: Mapping[str, str]):
    hd = _hd()
    from pydicom.sr.codedict import codes

    family = codes.cid7162.HistogramAnalysis if str(model.get("id", "")).startswith("hu-") else \
        codes.cid7162.ArtificialIntelligence
    return hd.AlgorithmIdentificationSequence(name=f"COVIDLesionSeg {model.get('id', '?')}", family=family,
                                              version=str(model.get("version", "")) or "0")


def _segment_description(number: int, seg: SegmentDef, model: Mapping[str, str]):
    hd = _hd()
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=seg.name, segmented_property_category=_coded(seg.category),
        segmented_property_type=_coded(seg.type), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(model), tracking_uid=hd.UID(), tracking_id=seg.name,
        anatomic_regions=[_coded(seg.region)] if seg.region is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*seg.color_rgb255))
    if seg.type_modifier is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _coded(seg.type_modifier)]
    return description


def build_segmentation(masks: Mapping[str, np.ndarray], geometry: Geometry, sources: Sequence[Any],
                       report: Mapping[str, Any]):
    """The DICOM SEG (a highdicom ``Segmentation``) of ``masks`` (segment name -> bool (z, y, x) on the
    source's grid ``geometry``) over the source images ``sources`` (pydicom headers)."""
    hd = _hd()
    indices = frame_indices(sources, geometry)
    order = np.argsort(indices)
    ordered = [sources[i] for i in order]
    models = report.get("models", {})
    present = [seg for seg in SEGMENTS if seg.name in masks]
    descriptions, planes = [], []
    for number, seg in enumerate(present, start=1):
        model = models.get("infection" if seg is SEGMENTS.infection else "lungs", {})
        descriptions.append(_segment_description(number, seg, model))
        mask = np.asarray(masks[seg.name], bool)
        if mask.shape != tuple(reversed(geometry.size)):
            raise ValueError(f"segment {seg.name!r}: mask shape {mask.shape} does not match the grid {geometry.size}")
        planes.append(mask)
    # (frames, rows, columns, segments); frame f is slice indices[order[f]] = f of the grid.
    pixels = np.stack(planes, axis=-1)
    segmentation = hd.seg.Segmentation(
        source_images=ordered, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=" + ".join(str(m.get("id", "")) for m in models.values()) or MANUFACTURER,
        software_versions=__version__, device_serial_number=f"COVIDLesionSeg-{__version__}",
        content_label="LUNGS", content_description="Right lung, left lung and COVID-19 infection",
        series_description="COVIDLesionSeg lungs and COVID-19 infection")
    return segmentation


def _measurement(name, value: Optional[float], unit, model: Mapping[str, str]):
    hd = _hd()
    if value is None:
        return None
    return hd.sr.Measurement(name=name, value=float(value), unit=unit,
                             algorithm_id=hd.sr.AlgorithmIdentification(
                                 name=f"COVIDLesionSeg {model.get('id', '?')}",
                                 version=str(model.get("version", "")) or "0"))


def build_measurement_report(segmentation, sources: Sequence[Any], report: Mapping[str, Any]):
    """The TID 1500 Comprehensive 3D SR of a case: volumes, percentages and scores (module docstring)."""
    hd = _hd()
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    q = report["quantification"]
    severity = q.get("severity", {})
    measured = q.get("infection_segmented", True) is not False
    models = report.get("models", {})
    lung_model = models.get("lungs", {})
    infection_model = models.get("infection", lung_model)
    ml = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
    percent = codes.UCUM.Percent
    points = hd.sr.CodedConcept("{score}", "UCUM", "score")
    po, pho = _local("PO", "Percentage of opacity"), _local("PHO", "Percentage of high opacity")
    zone_score = _local("ZS", "Six-zone CT severity score")
    lung_code = _coded(SEGMENTS.right_lung.type)

    groups = []
    numbers = {description.SegmentLabel: int(description.SegmentNumber)
               for description in segmentation.SegmentSequence}
    for seg, key, laterality in ((SEGMENTS.right_lung, "right_lung", SEGMENTS.right_lung.type_modifier),
                                 (SEGMENTS.left_lung, "left_lung", SEGMENTS.left_lung.type_modifier),
                                 (SEGMENTS.infection, "both_lungs", None)):
        if seg.name not in numbers:
            continue
        entry = q[key]
        is_infection = seg is SEGMENTS.infection
        model = infection_model if is_infection else lung_model
        items = [_measurement(codes.SCT.Volume, entry["infection_ml"] if is_infection else entry["volume_ml"], ml,
                              model)]
        if not is_infection and measured:
            items += [_measurement(po, entry.get("infected_percent"), percent, infection_model),
                      _measurement(pho, entry.get("high_opacity_percent"), percent, infection_model),
                      _measurement(zone_score, entry.get("zone_score"), points, infection_model)]
        site = hd.sr.FindingSite(anatomic_location=lung_code,
                                 laterality=_coded(laterality) if laterality is not None else None)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=seg.name),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=segmentation.SOPClassUID, sop_instance_uid=segmentation.SOPInstanceUID,
                segment_number=numbers[seg.name],
                source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID)),
            finding_type=_coded(seg.type), finding_sites=[site], algorithm_id=hd.sr.AlgorithmIdentification(
                name=f"COVIDLesionSeg {model.get('id', '?')}", version=str(model.get("version", "")) or "0"),
            measurements=[m for m in items if m is not None]))
    if measured and severity:
        both = [_measurement(po, severity["percentage_of_opacity"]["both_lungs"], percent, infection_model),
                _measurement(pho, severity["percentage_of_high_opacity"]["both_lungs"], percent, infection_model),
                _measurement(zone_score, severity.get("zone_score"), points, infection_model)]
        for zone, value in severity.get("zone_scores", {}).items():
            side, third = zone.split("_")
            both.append(_measurement(_local(f"ZS-{side[0].upper()}{third[0].upper()}",
                                            f"Zone score, {side} lung, {third} third"), value, points,
                                     infection_model))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="Both lungs"),
            finding_sites=[hd.sr.FindingSite(anatomic_location=lung_code)],
            measurements=[m for m in both if m is not None]))

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="COVIDLesionSeg", manufacturer_name=MANUFACTURER,
            model_name=" + ".join(f"{m.get('id', '')} {m.get('version', '')}".strip() for m in models.values())))
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*sources, segmentation], content=content, series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, series_description="COVIDLesionSeg lung infection measurements")
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = "COVIDLesionSeg"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _save(dataset, path: Path) -> None:
    dataset.save_as(str(path), enforce_file_format=True)


def _verify(expected_uid: str):
    def verify(path: Path) -> None:
        import pydicom

        from .outputs import _write_failure

        try:
            back = pydicom.dcmread(str(path))
            _ = back.PixelData if "PixelData" in back else None   # the whole file, pixel data included
        except Exception as exc:  # noqa: BLE001 - a truncated file raises from deep inside pydicom
            raise _write_failure(path, f"reading it back failed: {exc}") from None
        if back.SOPInstanceUID != expected_uid:
            raise _write_failure(path, "the file read back is another object")
    return verify


def write_seg_and_sr(seg_path: str | Path, sr_path: str | Path, masks: Mapping[str, np.ndarray],
                     geometry: Geometry, source_files: Sequence[str | Path],
                     report: Mapping[str, Any]) -> dict[str, Any]:
    """Write the case's DICOM SEG and SR (each atomic and read back); returns their description for the
    JSON report (``dicom_outputs``): SOP/series instance UIDs, the referenced series and frames."""
    from .outputs import atomic_write

    sources = read_sources(source_files)
    segmentation = build_segmentation(masks, geometry, sources, report)
    sr = build_measurement_report(segmentation, sources, report)
    atomic_write(seg_path, lambda tmp: _save(segmentation, tmp), _verify(segmentation.SOPInstanceUID))
    atomic_write(sr_path, lambda tmp: _save(sr, tmp), _verify(sr.SOPInstanceUID))
    return {"seg": {"file": Path(seg_path).name, "sop_instance_uid": str(segmentation.SOPInstanceUID),
                    "series_instance_uid": str(segmentation.SeriesInstanceUID),
                    "frames": int(segmentation.NumberOfFrames),
                    "segments": [str(d.SegmentLabel) for d in segmentation.SegmentSequence]},
            "sr": {"file": Path(sr_path).name, "sop_instance_uid": str(sr.SOPInstanceUID),
                   "series_instance_uid": str(sr.SeriesInstanceUID)},
            "source_series_instance_uid": str(sources[0].SeriesInstanceUID),
            "source_study_instance_uid": str(sources[0].StudyInstanceUID)}
