"""batch.py's input options (issue 11): DICOM series with missing slices and the --device note."""

from __future__ import annotations

import pytest
import SimpleITK as sitk

from COVIDLesionSegLib.errors import InputError
from Testing.engine.helpers import _ramp_series

from .helpers import _batch_module


def test_batch_refuses_missing_dicom_slices_unless_allowed(tmp_path):
    from COVIDLesionSegLib import mrml

    _ramp_series(tmp_path / "gap", [2.5 * k for k in range(10) if k != 4], "1.2.3.4.1100")
    batch = _batch_module()
    assert batch.build_parser().parse_args(["--input", "x", "--output", "y", "--allow-slice-gaps"]).allow_slice_gaps
    with pytest.raises(InputError, match="--allow-slice-gaps"):
        batch.SceneContext().load(tmp_path / "gap", "gap")
    context = batch.SceneContext(allow_slice_gaps=True)
    node = context.load(tmp_path / "gap", "gap")
    image = mrml.image_from_volume_node(node)
    assert image.GetSize()[2] == 10 and image.GetSpacing()[2] == pytest.approx(2.5)
    assert sitk.GetArrayFromImage(image)[4, 0, 0] == round(2.5 * 4 * 4) - 900   # the interpolated slice
    context.scene.Clear(1)


def test_batch_writes_dicom_seg_and_sr_for_a_dicom_series(tmp_path):
    """--dicom in batch.py: the same SEG/SR writer as the command line, on the segments saved by Slicer's storage
    node; a NIfTI input beside it gets the note instead."""
    import json

    import highdicom as hd
    import numpy as np
    import pydicom

    from COVIDLesionSegLib import outputs
    from Testing.engine.dicom_series import series_uids, write_ct_series
    from Testing.engine.faults import write_phantom

    ct = write_phantom(tmp_path / "in" / "nifti_case.nii.gz")
    files = write_ct_series(sitk.ReadImage(str(ct)), tmp_path / "in" / "dicom_case", seed="batch")
    batch = _batch_module()
    out = tmp_path / "out"
    assert batch.main(["--input", str(tmp_path / "in"), "--output", str(out), "--device", "cpu", "--dicom"]) == 0
    report = json.loads((out / "dicom_case.json").read_text())
    assert report["outputs"]["dicom_seg"] == "dicom_case_seg.dcm"
    seg = hd.seg.segread(str(out / "dicom_case_seg.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uids("batch")["series"]
    masks, _ = outputs.read_segmentation_nrrd(out / "dicom_case.seg.nrrd")
    uids = [pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID for f in files]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2, 3],
                                               assert_missing_frames_are_empty=True)
    for number, description in enumerate(seg.SegmentSequence):
        assert np.array_equal(pixels[..., number] > 0, masks[description.SegmentLabel])
    assert report["dicom_outputs"]["sr"]["sop_instance_uid"] == hd.sr.srread(str(out / "dicom_case_sr.dcm")).SOPInstanceUID
    assert report["input"]["dicom"]["header"]["PatientID"] == "P001"
    nifti = json.loads((out / "nifti_case.json").read_text())
    assert "dicom_seg" not in nifti["outputs"]
    assert any("DICOM SEG and SR not written" in n for n in nifti["notes"])
    assert (out / "report.html").is_file() and (out / "nifti_case_report.pdf").is_file()
