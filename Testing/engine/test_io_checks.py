"""Reading CT (files and DICOM series) and the input checks: each bad input gets a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib.checks import check_ct
from COVIDLesionSegLib.errors import InputError
from COVIDLesionSegLib.io import case_name, read_image
from COVIDLesionSegLib.volume import CTVolume, Geometry
from Testing.conftest import shared_file
from Testing.engine.helpers import _write_dicom_series, hu_image


def test_plausible_ct_passes_unchanged():
    img = hu_image()
    out, notes = check_ct(img)
    assert out is img and notes == []


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: sitk.GetImageFromArray(np.clip(sitk.GetArrayFromImage(hu_image()) + 1000, 0, 255).astype(np.uint8)),
         "already windowed to 0-255"),
        (lambda: sitk.GetImageFromArray(np.zeros((80, 80), np.int16)), "2D"),
        (lambda: sitk.GetImageFromArray(np.zeros((1, 80, 80), np.int16)), "2D"),
        (lambda: sitk.GetImageFromArray(np.full((8, 80, 80), -1000, np.int16)), "same value"),
        (lambda: sitk.GetImageFromArray(np.full((8, 80, 80), np.nan, np.float32)), "NaN"),
        (lambda: sitk.GetImageFromArray(np.where(np.arange(8 * 80 * 80).reshape(8, 80, 80) % 7 == 0, np.nan,
                                                 sitk.GetArrayFromImage(hu_image())).astype(np.float32)), "NaN"),
        (lambda: hu_image(shape_zyx=(3, 80, 80)), "too small"),
        (lambda: hu_image(shape_zyx=(8, 32, 32)), "too small"),
        (lambda: sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (8, 80, 80, 3), np.uint8),
                                        isVector=True), "components per voxel"),
        (lambda: sitk.GetImageFromArray(sitk.GetArrayFromImage(hu_image()) + 1024), "rescale intercept"),
        (lambda: sitk.GetImageFromArray(np.random.default_rng(0).integers(100, 1500, (8, 80, 80)).astype(np.int16)),
         "rescale intercept"),
        (lambda: sitk.GetImageFromArray(np.random.default_rng(0).normal(300, 80, (8, 80, 80)).astype(np.float32)),
         "does not look like a chest CT"),
    ],
    ids=["windowed-0-255", "2d", "single-slice", "constant", "all-nan", "some-nan", "few-slices", "tiny-in-plane",
         "rgb", "no-intercept", "mr-like-integers", "positive-floats"],
)
def test_bad_inputs_are_refused_with_a_reason(make, expected):
    with pytest.raises(InputError, match=expected):
        check_ct(make())


def test_declared_window_maps_8bit_back_to_hu():
    hu = sitk.GetArrayFromImage(hu_image()).astype(np.float32)
    level, width = -600.0, 1500.0
    grey = np.clip(np.round((hu - (level - width / 2)) / width * 255), 0, 255).astype(np.uint8)
    out, notes = check_ct(sitk.GetImageFromArray(grey), input_window=(level, width))
    back = sitk.GetArrayFromImage(out)
    inside = (hu > level - width / 2) & (hu < level + width / 2)
    assert np.max(np.abs(back[inside] - hu[inside])) <= width / 255  # one grey level
    assert any("approximate" in n for n in notes)


def test_declared_window_on_hu_image_is_refused():
    with pytest.raises(InputError, match="not 8-bit"):
        check_ct(hu_image(), input_window=(-600, 1500))


def test_read_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")
    bogus = tmp_path / "notes.nii.gz"
    bogus.write_text("this is not an image")
    with pytest.raises(InputError, match="cannot be read"):
        read_image(bogus)
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="unsupported file type"):
        read_image(tmp_path / "scan.png")
    (tmp_path / "slice.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(InputError, match="give the folder"):
        read_image(tmp_path / "slice.dcm")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(empty_dir)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "ct.nrrd"
    writer = sitk.ImageFileWriter()
    writer.SetUseCompression(False)
    writer.SetFileName(str(path))
    writer.Execute(hu_image())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated|cannot be read"):
        read_image(path)


def test_huge_volume_refused_from_header_alone(tmp_path):
    # A MetaImage header that claims 2048 x 2048 x 1000 voxels: refused before any pixel is read
    # (the data file does not even exist), so memory is never exhausted.
    header = tmp_path / "huge.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2048 2048 1000\nElementType = MET_SHORT\n"
                      "ElementSpacing = 1 1 1\nElementDataFile = huge.raw\n")
    with pytest.raises(InputError, match="million voxels"):
        read_image(header)


def test_512x512x1000_volume_reads_as_int16(tmp_path):
    """A 512 x 512 x 1000 int32 volume (LIDC files are int32) is compacted to int16 (512 MB, not 1 GB)."""
    img = sitk.Image([512, 512, 1000], sitk.sitkInt32)
    img = img - 1000
    path = tmp_path / "big.nrrd"
    sitk.WriteImage(img, str(path), useCompression=False)
    del img
    out, _ = read_image(path)
    assert out.GetPixelID() == sitk.sitkInt16
    assert out.GetSize() == (512, 512, 1000)


def test_case_names():
    assert case_name("/a/b/patient1.nii.gz") == "patient1"
    assert case_name("/a/b/patient1.seg.nrrd") == "patient1"
    assert case_name("/a/b/series_folder") == "series_folder"
    assert case_name("scan.MHA") == "scan"


def test_real_dicom_series_geometry():
    folder = shared_file("dicom/ct_20_slices")
    image, notes = read_image(folder)
    assert image.GetSize() == (512, 512, 20)
    assert image.GetSpacing() == pytest.approx((0.9765625, 0.9765625, 2.0))
    # The origin is the first slice's ImagePositionPatient (the most inferior, since GDCM sorts by position).
    first = sorted(folder.iterdir())[0]
    reader = sitk.ImageFileReader()
    positions = []
    for f in sorted(folder.iterdir()):
        reader.SetFileName(str(f))
        reader.ReadImageInformation()
        positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
    lowest = min(positions, key=lambda p: p[2])
    assert image.GetOrigin() == pytest.approx(tuple(lowest))
    assert first.exists() and notes == []
    checked, _ = check_ct(image)
    assert checked.GetSize() == image.GetSize()


def test_dicom_folder_picks_largest_series_and_orders_by_position(tmp_path):
    base = sitk.GetArrayFromImage(hu_image(shape_zyx=(12, 80, 80)))
    base[np.arange(12), 5, 5] = np.arange(12) * 10 - 900   # a per-slice marker to check ordering
    _write_dicom_series(tmp_path / "dcm" / "a", base, (0.8, 0.8, 2.5), "1.2.3.4.100")
    _write_dicom_series(tmp_path / "dcm" / "b", base[:6], (0.8, 0.8, 2.5), "1.2.3.4.200")
    image, notes = read_image(tmp_path / "dcm")
    assert image.GetSize() == (80, 80, 12)
    assert any("2 DICOM series" in n for n in notes)
    arr = sitk.GetArrayFromImage(image)
    assert list(arr[:, 5, 5]) == list(np.arange(12) * 10 - 900)
    assert image.GetSpacing()[2] == pytest.approx(2.5)


def test_dicom_gantry_tilt_and_uneven_spacing_are_reported(tmp_path):
    base = sitk.GetArrayFromImage(hu_image(shape_zyx=(8, 80, 80)))
    _write_dicom_series(tmp_path / "tilt", base, (0.8, 0.8, 2.5), "1.2.3.4.300", tilt_mm_per_slice=0.5)
    _, notes = read_image(tmp_path / "tilt")
    assert any("gantry tilt" in n for n in notes)
    z = [0, 2.5, 5, 7.5, 10.5, 13, 15.5, 18]   # one 3 mm step: uneven, but no slice missing
    _write_dicom_series(tmp_path / "uneven", base, (0.8, 0.8, 2.5), "1.2.3.4.400", positions_z=z)
    _, notes = read_image(tmp_path / "uneven")
    assert any("uneven slice spacing" in n for n in notes)


def test_canonical_orientation_round_trip_is_exact():
    img = hu_image(shape_zyx=(10, 80, 90))
    img.SetOrigin((12.5, -30.25, 100.0))
    # a permuted and flipped direction (RAI-like with axes swapped)
    img.SetDirection((0, -1, 0, 1, 0, 0, 0, 0, -1))
    vol = CTVolume.from_image(img)
    assert vol.image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    marker = np.zeros(vol.shape, np.uint8)
    marker[2, 3, 4] = 1
    back = vol.to_input_geometry(marker)
    assert Geometry.of(back) == Geometry.of(img)
    # the marked voxel is the same physical point on both grids
    idx = np.argwhere(sitk.GetArrayFromImage(back))[0][::-1]
    p_back = back.TransformIndexToPhysicalPoint([int(i) for i in idx])
    p_canon = vol.image.TransformIndexToPhysicalPoint([4, 3, 2])
    assert p_back == pytest.approx(p_canon)
