"""Quality warnings (``quality.py``), each on a constructed case where it must fire and a twin where it must not.

The constructed chest: canonical (z, y, x) grid of 50 x 60 x 70 voxels, 2.5 mm slices and 5 mm pixels
(0.0625 mL per voxel), air outside the body, soft tissue (40 HU) around two box lungs of 2000 mL each
(-850 HU) that leave a mediastinum between them. Every case is a copy with one thing changed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib import LABEL_LEFT_LUNG, LABEL_RIGHT_LUNG, io, quality
from COVIDLesionSegLib.quantify import quantify
from COVIDLesionSegLib.volume import CTVolume

from .test_io_checks import _write_dicom_series

SPACING_XYZ = (5.0, 5.0, 2.5)


def chest(spacing_xyz=SPACING_XYZ):
    """(hu, lungs, infection) of the clean constructed chest: no warning applies to it."""
    hu = np.full((50, 60, 70), -1000, np.int16)
    hu[:, 5:55, 3:67] = 40                    # the body
    lungs = np.zeros(hu.shape, np.uint8)
    lungs[5:45, 10:50, 5:25] = LABEL_RIGHT_LUNG     # 40 * 40 * 20 = 32000 voxels = 2000 mL
    lungs[5:45, 10:50, 45:65] = LABEL_LEFT_LUNG
    hu[lungs > 0] = -850
    infection = np.zeros(hu.shape, bool)
    infection[20:30, 30:40, 10:20] = True     # inside the right lung, away from every face
    hu[infection] = -500
    return hu, lungs, infection


def assess(hu, lungs, infection, spacing_xyz=SPACING_XYZ, dicom=None):
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing_xyz)
    volume = CTVolume.from_image(image)
    quantities = quantify(lungs, infection, volume.spacing_zyx, hu=volume.hu)
    return {w.code: w.message for w in quality.assess(volume, lungs, infection, quantities, dicom)}


def test_the_clean_chest_has_no_warning():
    assert assess(*chest()) == {}


def test_lungs_cut_by_the_first_slice_and_by_the_field_of_view():
    hu, lungs, infection = chest()
    # The scan starts at slice 10: the lungs (from slice 5) are cut at their bases.
    warnings = assess(hu[10:], lungs[10:], infection[10:])
    assert list(warnings) == ["lungs_cut_by_scan_range"]
    assert "the lowest slice (the lung bases)" in warnings["lungs_cut_by_scan_range"]
    assert "does not cover the whole lungs" in warnings["lungs_cut_by_scan_range"]
    # A few voxels (under 100 mm^2) on the top slice are the end of the airway, not a cut lung.
    stray = lungs.copy()
    stray[49, 20, 10:12] = LABEL_RIGHT_LUNG
    assert "lungs_cut_by_scan_range" not in assess(hu, stray, infection)
    # The left lung reaching the patient's left side of the field of view.
    wide = lungs.copy()
    wide[5:45, 10:50, 45:70] = LABEL_LEFT_LUNG
    warnings = assess(hu, wide, infection)
    assert "the patient's left side of the field of view" in warnings["lungs_cut_by_field_of_view"]


def test_thick_slices_from_the_spacing_or_the_dicom_header():
    assert "thick_slices" in assess(*chest(), spacing_xyz=(5.0, 5.0, 6.0))
    assert "thick_slices" not in assess(*chest(), spacing_xyz=(5.0, 5.0, 5.0))   # 5 mm is allowed
    # DICOM Slice Thickness (7 mm slices reconstructed every 2.5 mm) overrides the spacing.
    dicom = io.DicomSource(folder="x", series=io.DicomSeries(uid="1.2", files=()), files=(),
                           header={"SliceThickness": "7"})
    message = assess(*chest(), dicom=dicom)["thick_slices"]
    assert "7 mm thick (DICOM Slice Thickness)" in message


def test_gantry_tilt_and_uneven_spacing_of_a_real_dicom_series(tmp_path):
    hu, _, _ = chest()
    _write_dicom_series(tmp_path / "tilt", hu[:8], (5.0, 5.0, 2.5), "1.2.3.4.500", tilt_mm_per_slice=0.5)
    _image, _notes, tilted = io.read_input(tmp_path / "tilt")
    z = [0, 2.5, 5, 7.5, 10.5, 13, 15.5, 18]        # one 3 mm step
    _write_dicom_series(tmp_path / "uneven", hu[:8], (5.0, 5.0, 2.5), "1.2.3.4.501", positions_z=z)
    _image, _notes, uneven = io.read_input(tmp_path / "uneven")
    _write_dicom_series(tmp_path / "even", hu[:8], (5.0, 5.0, 2.5), "1.2.3.4.502")
    _image, _notes, even = io.read_input(tmp_path / "even")
    assert tilted.tilt_deg == pytest.approx(11.3, abs=0.1)   # atan(0.5 / 2.5)
    case = chest()
    assert "gantry tilt of 11.3 degrees" in assess(*case, dicom=tilted)["gantry_tilt"]
    assert "uneven slice spacing" in assess(*case, dicom=uneven)["uneven_slice_spacing"]
    clean = assess(*case, dicom=even)
    assert "gantry_tilt" not in clean and "uneven_slice_spacing" not in clean


def test_implausible_lung_volume_and_left_right_imbalance():
    hu, lungs, infection = chest()
    small = lungs.copy()
    small[5:45, 10:50, 5:20] = 0                    # right lung 5 columns: 500 mL
    small[5:45, 10:50, 50:65] = 0                   # left lung 5 columns: 500 mL -> 1.0 L in all
    warnings = assess(hu, small, np.zeros_like(infection))
    assert "1.00 L together" in warnings["implausible_lung_volume"]
    assert "lung_imbalance" not in warnings
    # The left lung at 40 % of the right (12 of 20 columns removed).
    uneven = lungs.copy()
    uneven[5:45, 10:50, 45:57] = 0
    warnings = assess(hu, uneven, infection)
    assert "the left lung (800 mL) is 40 % of the other's volume" in warnings["lung_imbalance"]
    # 85 % (3 columns removed) is normal.
    normal = lungs.copy()
    normal[5:45, 10:50, 45:48] = 0
    assert "lung_imbalance" not in assess(hu, normal, infection)


def test_infection_at_the_image_border():
    hu, lungs, infection = chest()
    lungs = lungs.copy()
    lungs[5:45, 10:50, 0:25][lungs[5:45, 10:50, 0:25] == 0] = LABEL_RIGHT_LUNG   # right lung to x = 0
    border = infection.copy()
    border[20:22, 20:22, 0:6] = True                # 4 voxels of 12.5 mm^2 on the x = 0 face
    warnings = assess(hu, lungs, border)
    assert "infection reaches the patient's right side of the field of view" in warnings["infection_at_image_border"]
    assert "infection_at_image_border" not in assess(hu, lungs, infection)


def test_contrast_from_the_mediastinum_or_the_dicom_header():
    hu, lungs, infection = chest()
    enhanced = hu.copy()
    enhanced[5:45, 10:35, 25:45] = 250              # the anterior mediastinum at the density of enhanced blood
    message = assess(enhanced, lungs, infection)["contrast_enhanced"]
    assert "100 % of the mediastinal soft tissue" in message
    plain = hu.copy()
    plain[5:45, 10:35, 25:45] = 45                  # unenhanced blood
    plain[5:45, 40:50, 32:38] = 300                 # the spine's cancellous bone lies in the posterior 40 %
    assert "contrast_enhanced" not in assess(plain, lungs, infection)
    dicom = io.DicomSource(folder="x", series=io.DicomSeries(uid="1.2", files=()), files=(),
                           header={"ContrastBolusAgent": "Omnipaque 350"})
    assert 'names a contrast agent ("Omnipaque 350")' in assess(plain, lungs, infection, dicom=dicom)["contrast_enhanced"]
    none = dataclasses.replace(dicom, header={"ContrastBolusAgent": "NONE"})
    assert "contrast_enhanced" not in assess(plain, lungs, infection, dicom=none)


def test_metal_but_not_bone():
    hu, lungs, infection = chest()
    bone = hu.copy()
    bone[10:40, 52:55, 30:40] = 1500                # dense cortical bone: no warning
    assert "metal" not in assess(bone, lungs, infection)
    metal = bone.copy()
    metal[20:22, 8:9, 30:32] = 3071                 # 4 voxels = 0.25 mL of a sternal wire
    assert "0.2 mL of the image is denser than 2500 HU" in assess(metal, lungs, infection)["metal"]


def test_codes_are_listed_in_check_order():
    hu, lungs, infection = chest()
    hu = hu.copy()
    hu[20:22, 8:9, 30:32] = 3071
    warnings = assess(hu, lungs, infection, spacing_xyz=(4.0, 4.0, 6.0))   # lungs 3.1 L each
    assert list(warnings) == ["thick_slices", "metal"]
    assert all(code in quality.CODES for code in warnings)
