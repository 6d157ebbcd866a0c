"""DICOM SEG and SR of a DICOM input, read back with highdicom and pydicom (``dicom_export.py``).

The source is COVID-CT-MD P001 written as a real DICOM series (``dicom_series.py``) and segmented by the shared
``covidlesionseg segment ... --dicom`` batch (``conftest.real_batch``). Where Debian's dicom3tools are installed
(``apt-get install dicom3tools``) its validator ``dciodvfy`` must find no error in either file.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib import dicom_export
from COVIDLesionSegLib.segments import SEGMENTS, TERMINOLOGY_FILE
from COVIDLesionSegLib.volume import Geometry

from .conftest import DICOM_CASE
from .dicom_series import series_uids

hd = pytest.importorskip("highdicom")


@pytest.fixture(scope="module")
def dicom_case(real_batch):
    status, out, root = real_batch
    assert status == 0
    sources = sorted((root / DICOM_CASE).glob("*.dcm"))
    headers = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in sources]
    return {"out": out, "headers": headers, "report": json.loads((out / f"{DICOM_CASE}.json").read_text()),
            "seg": hd.seg.segread(str(out / f"{DICOM_CASE}_seg.dcm")),
            "sr": hd.sr.srread(str(out / f"{DICOM_CASE}_sr.dcm")),
            "labels": sitk.ReadImage(str(out / f"{DICOM_CASE}_labels.nii.gz"))}


def _terminology_codes() -> dict[str, tuple[str, ...]]:
    """3dSlicerLabel -> (category, type, modifier) code values from the project's Slicer terminology file."""
    found = {}
    for category in json.loads(TERMINOLOGY_FILE.read_text())["SegmentationCodes"]["Category"]:
        for type_ in category.get("Type", []):
            for modifier in type_.get("Modifier", []) or [type_]:
                found[modifier["3dSlicerLabel"]] = (category["CodeValue"], type_["CodeValue"],
                                                    modifier["CodeValue"] if modifier is not type_ else "")
    return found


def test_seg_has_the_three_segments_with_the_terminology_codes(dicom_case):
    seg = dicom_case["seg"]
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    terms = _terminology_codes()
    descriptions = list(seg.SegmentSequence)
    assert [d.SegmentLabel for d in descriptions] == [s.name for s in SEGMENTS]
    for number, (description, definition) in enumerate(zip(descriptions, SEGMENTS), start=1):
        assert description.SegmentNumber == number
        category = description.SegmentedPropertyCategoryCodeSequence[0]
        type_ = description.SegmentedPropertyTypeCodeSequence[0]
        modifier = type_.SegmentedPropertyTypeModifierCodeSequence[0]
        assert {category.CodingSchemeDesignator, type_.CodingSchemeDesignator, modifier.CodingSchemeDesignator} == {"SCT"}
        assert (category.CodeValue, type_.CodeValue, modifier.CodeValue) == terms[definition.slicer_label]
        assert description.SegmentAlgorithmType == "AUTOMATIC"
        model = dicom_case["report"]["models"]["infection" if definition is SEGMENTS.infection else "lungs"]
        assert description.SegmentAlgorithmName == f"COVIDLesionSeg {model['id']}"
        rgb = hd.color.CIELabColor.from_dicom_value(description.RecommendedDisplayCIELabValue).to_rgb()
        assert np.allclose(rgb, definition.color_rgb255, atol=1)
    infection = descriptions[2]
    assert infection.AnatomicRegionSequence[0].CodeValue == "39607008"     # Lung
    assert (descriptions[0].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
            .CodeMeaning == "Right")


def test_seg_references_the_source_series_and_frames_at_their_positions(dicom_case):
    seg, headers = dicom_case["seg"], dicom_case["headers"]
    uids = series_uids("P001")
    assert seg.StudyInstanceUID == uids["study"] == headers[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == uids["frame_of_reference"]
    assert seg.PatientID == "P001" and str(seg.PatientName) == "COVID-CT-MD^P001"
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == uids["series"]
    by_uid = {h.SOPInstanceUID: h for h in headers}
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} <= set(by_uid)
    assert seg.NumberOfFrames == dicom_case["report"]["dicom_outputs"]["seg"]["frames"] > 0
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (source,) = frame.DerivationImageSequence[0].SourceImageSequence
        header = by_uid[source.ReferencedSOPInstanceUID]
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose([float(v) for v in position], [float(v) for v in header.ImagePositionPatient], atol=1e-4)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose([float(v) for v in orientation], [float(v) for v in headers[0].ImageOrientationPatient])


def test_seg_pixels_equal_the_labelmap(dicom_case):
    """Every source slice (empty frames included) gets back exactly the case's labelmap."""
    seg, headers, labels_image = dicom_case["seg"], dicom_case["headers"], dicom_case["labels"]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[h.SOPInstanceUID for h in headers],
                                               segment_numbers=[1, 2, 3], assert_missing_frames_are_empty=True)
    labels = sitk.GetArrayFromImage(labels_image)
    for header, planes in zip(headers, pixels):
        k = labels_image.TransformPhysicalPointToIndex([float(v) for v in header.ImagePositionPatient])[2]
        rebuilt = np.zeros(planes.shape[:2], np.uint8)
        for number in (1, 2, 3):                       # infection last: it takes precedence, as in the labelmap
            rebuilt[planes[..., number - 1] > 0] = number
        assert np.array_equal(rebuilt, labels[k]), f"slice {k}"
    assert labels.max() == 3 and pixels[..., 2].any()


def test_sr_reports_the_measures_with_the_models_as_algorithm(dicom_case):
    sr, report = dicom_case["sr"], dicom_case["report"]
    q = report["quantification"]
    seg_uid = dicom_case["seg"].SOPInstanceUID
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"      # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {s.SeriesInstanceUID: len(s.ReferencedSOPSequence)
                for e in sr.CurrentRequestedProcedureEvidenceSequence for s in e.ReferencedSeriesSequence}
    assert evidence[series_uids("P001")["series"]] == len(dicom_case["headers"])
    assert evidence[dicom_case["seg"].SeriesInstanceUID] == 1
    groups = {g.tracking_identifier: g for g in sr.content.get_volumetric_roi_measurement_groups()}
    assert list(groups) == [s.name for s in SEGMENTS]
    models = report["models"]

    def values(group):
        out = {}
        for m in group.get_measurements():
            names = {c.ConceptNameCodeSequence[0].CodeValue: c.TextValue for c in m[0].ContentSequence
                     if c.ValueType == "TEXT"}
            out[m.name.value] = (m.value, m.unit.value, names.get("111001"), names.get("111003"))
        return out

    for number, (seg, key) in enumerate(zip(SEGMENTS, ("right_lung", "left_lung", "both_lungs")), start=1):
        group = groups[seg.name]
        assert group.referenced_segment.referenced_sop_instance_uid == seg_uid
        assert group.referenced_segment.referenced_segment_numbers == [number]
        got = values(group)
        volume = q[key]["infection_ml" if seg is SEGMENTS.infection else "volume_ml"]
        lung_or_infection = models["infection" if seg is SEGMENTS.infection else "lungs"]
        assert got["118565006"] == (pytest.approx(volume), "mL", f"COVIDLesionSeg {lung_or_infection['id']}",
                                    lung_or_infection["version"])
        if seg is not SEGMENTS.infection:
            assert got["PO"][:2] == (pytest.approx(q[key]["infected_percent"]), "%")
            assert got["PHO"][:2] == (pytest.approx(q[key]["high_opacity_percent"]), "%")
            assert got["ZS"][0] == q[key]["zone_score"]
            assert got["PO"][2] == f"COVIDLesionSeg {models['infection']['id']}"
    (both,) = sr.content.get_image_measurement_groups()
    measured = {m.name.value: m.value for m in both.get_measurements()}
    severity = q["severity"]
    assert measured["PO"] == pytest.approx(severity["percentage_of_opacity"]["both_lungs"])
    assert measured["PHO"] == pytest.approx(severity["percentage_of_high_opacity"]["both_lungs"])
    assert measured["ZS"] == severity["zone_score"]
    assert measured["ZS-RL"] == severity["zone_scores"]["right_lower"]
    schemes = [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence]
    assert dicom_export.SCHEME in schemes


def test_json_and_report_describe_the_dicom_outputs_and_the_patient(dicom_case):
    report, out = dicom_case["report"], dicom_case["out"]
    assert report["outputs"]["dicom_seg"] == f"{DICOM_CASE}_seg.dcm"
    assert report["outputs"]["dicom_sr"] == f"{DICOM_CASE}_sr.dcm"
    described = report["dicom_outputs"]
    assert described["seg"]["sop_instance_uid"] == dicom_case["seg"].SOPInstanceUID
    assert described["sr"]["sop_instance_uid"] == dicom_case["sr"].SOPInstanceUID
    assert described["source_series_instance_uid"] == series_uids("P001")["series"]
    assert report["input"]["dicom"]["header"]["PatientID"] == "P001"
    page = (out / f"{DICOM_CASE}_report.html").read_text(encoding="utf-8")
    assert "COVID-CT-MD, P001" in page and "ACC0001" in page and "2020-04-15" in page


@pytest.mark.parametrize("suffix", ["seg", "sr"])
def test_dciodvfy_finds_no_error(dicom_case, suffix):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools)")
    done = subprocess.run(["dciodvfy", str(dicom_case["out"] / f"{DICOM_CASE}_{suffix}.dcm")],
                          capture_output=True, text=True, timeout=300)
    lines = (done.stdout + done.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == [], "\n".join(errors[:20])
    # The only warnings allowed: this project's private coding scheme is not one of DICOM's defined terms.
    others = [line for line in lines if line.startswith("Warning") and dicom_export.SCHEME not in line]
    assert others == [], "\n".join(others[:20])


def test_a_grid_that_does_not_match_the_source_is_refused(dicom_case):
    headers = dicom_case["headers"]
    geometry = Geometry.of(dicom_case["labels"])
    with pytest.raises(dicom_export.DicomExportError, match="one to one"):
        dicom_export.frame_indices(headers[:-1], geometry)          # a missing slice
    shifted = Geometry(geometry.size, geometry.spacing, tuple(np.add(geometry.origin, (0, 0, 0.7))),
                       geometry.direction)
    with pytest.raises(dicom_export.DicomExportError, match="does not lie on a slice"):
        dicom_export.frame_indices(headers, shifted)
