"""Input robustness (issue 11, input side): the same physical scan gives the same physical result however it
is stored, and damaged or ambiguous inputs are refused with a reason instead of being read silently."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib.phantom import make_chest_phantom
from COVIDLesionSegLib.pipeline import Pipeline, SegmentOptions
from COVIDLesionSegLib.volume import CTVolume
from Testing.engine.helpers import _ramp_series, _write_dicom_series

# Every DICOM orientation code: one letter of each pair, in any axis order (48 codes).
ORIENTATIONS = ["".join(p) for letters in itertools.product("LR", "PA", "SI")
                for p in itertools.permutations(letters)]


@pytest.fixture(scope="module")
def hu_pipeline():
    return Pipeline(SegmentOptions(device="cpu"))


def _lps_labels(result) -> np.ndarray:
    """The result's labelmap on the input grid, brought to LPS, to compare results in physical space."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(result.labelmap_in_input_geometry(), "LPS"))


def _volumes(result) -> dict:
    q = result.quantities
    return {side: (q[side]["volume_ml"], q[side]["infection_ml"]) for side in ("right_lung", "left_lung")}


@pytest.mark.parametrize("shape_zyx, spacing_zyx", [((40, 96, 104), (6.0, 3.6, 3.4)),
                                                    ((32, 112, 112), (8.0, 3.2, 3.2))],
                         ids=["6mm-slices", "8mm-slices"])
def test_random_orientation_and_tiny_spacing_changes_give_identical_physical_results(hu_pipeline, shape_zyx,
                                                                                     spacing_zyx):
    """Property: storing the scan in any of the 48 axis orders / flips, with its spacing changed by a few
    1e-14 mm (what a format conversion or a float32 header does), changes nothing: same mL, same voxels."""
    image, _ = make_chest_phantom(shape_zyx=shape_zyx, spacing_zyx=spacing_zyx)
    base = hu_pipeline.run(CTVolume.from_image(image))
    base_labels, base_volumes = _lps_labels(base), _volumes(base)
    rng = np.random.default_rng(11)
    for draw in range(3):
        code = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
        stored = sitk.DICOMOrient(image, code)
        eps = rng.choice([-2e-14, -1e-14, 1e-14, 2e-14], size=3)
        eps[draw % 3] = -1e-14 if draw == 0 else 1e-14   # each run has one axis nudged each way
        stored.SetSpacing([float(s + e) for s, e in zip(stored.GetSpacing(), eps, strict=True)])
        result = hu_pipeline.run(CTVolume.from_image(stored))
        assert _volumes(result) == base_volumes, (code, eps.tolist())
        assert np.array_equal(_lps_labels(result), base_labels), (code, eps.tolist())


# ------------------------------------------------------------------------------------ DICOM series (item 4)

def test_dicom_series_with_missing_slices_is_refused_unless_allowed(tmp_path):
    from COVIDLesionSegLib.errors import InputError
    from COVIDLesionSegLib.io import read_image

    z_all = [2.5 * k for k in range(12)]
    z_kept = [z for k, z in enumerate(z_all) if k not in (5, 6)]        # two slices lost in transfer
    _ramp_series(tmp_path / "gap", z_kept, "1.2.3.4.500")
    with pytest.raises(InputError, match=r"2 missing.*10.*17\.5.*--allow-slice-gaps"):
        read_image(tmp_path / "gap")

    image, notes = read_image(tmp_path / "gap", allow_slice_gaps=True)
    # Resampled onto the true positions: 12 slices 2.5 mm apart from the first slice's position.
    assert image.GetSize() == (80, 80, 12)
    assert image.GetSpacing()[2] == pytest.approx(2.5)
    assert image.GetOrigin()[2] == pytest.approx(0.0)
    marker = sitk.GetArrayFromImage(image)[:, 0, 0]
    assert marker.tolist() == [round(z * 4) - 900 for z in z_all]          # the ramp, missing slices included
    assert any("interpolated" in n and "2 missing" in n for n in notes), notes


def test_evenly_spaced_dicom_series_is_read_as_stored(tmp_path):
    from COVIDLesionSegLib.io import read_image

    z = [2.5 * k for k in range(10)]
    arr = _ramp_series(tmp_path / "even", z, "1.2.3.4.510")
    image, notes = read_image(tmp_path / "even", allow_slice_gaps=True)
    assert np.array_equal(sitk.GetArrayFromImage(image), arr)
    assert not any("interpolated" in n for n in notes)


def test_every_dicom_series_is_named_and_the_used_one_said(tmp_path):
    from COVIDLesionSegLib.io import read_image

    _ramp_series(tmp_path / "study" / "s3", [2.5 * k for k in range(10)], "1.2.3.4.600",
                 tags={"0008|103e": "ThoraxRoutine 1.0 B40f", "0020|0011": "3"})
    _ramp_series(tmp_path / "study" / "s2", [5.0 * k for k in range(6)], "1.2.3.4.700",
                 tags={"0008|103e": "Lung 5.0", "0020|0011": "2"})
    # A PET/CT export: the PET series has more slices but is not the CT.
    _ramp_series(tmp_path / "study" / "pet", [2.5 * k for k in range(14)], "1.2.3.4.750",
                 tags={"0008|0060": "PT", "0008|103e": "PET AC"})
    image, notes = read_image(tmp_path / "study")
    assert image.GetSize()[2] == 10
    text = " ".join(notes)
    for expected in ("3 DICOM series", "PET AC", "14 slices", "ThoraxRoutine 1.0 B40f", "Lung 5.0", "1.2.3.4.600", "1.2.3.4.700",
                     "10 slices", "6 slices"):
        assert expected in text, (expected, notes)
    used = [n for n in notes if "used" in n.lower()]
    assert used and "1.2.3.4.600" in used[0] and "1.2.3.4.700" not in used[0] and "PET" not in used[0], notes


def test_cli_allow_slice_gaps_flag(tmp_path, capsys):
    from COVIDLesionSegLib.cli import main

    image, _ = make_chest_phantom(shape_zyx=(40, 96, 104), spacing_zyx=(6.0, 3.6, 3.4))
    arr = sitk.GetArrayFromImage(image)
    keep = [k for k in range(40) if k != 20]
    _write_dicom_series(tmp_path / "series", arr[keep], (3.4, 3.6, 6.0), "1.2.3.4.800",
                        positions_z=[6.0 * k for k in keep])
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "series"), "-o", str(out), "--quiet"]) == 1
    assert "--allow-slice-gaps" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "series"), "-o", str(out), "--quiet", "--allow-slice-gaps"]) == 0
    import json
    report = json.loads((out / "series.json").read_text())
    assert report["input"]["size"] == [104, 96, 40]
    assert any("interpolated" in n for n in report["notes"])


# ------------------------------------------------------------------ truncated and corrupted files (fault injection)

# (file name, compressed, the file that holds the pixels): every file format the reader accepts.
FORMATS = [("ct.nii", False, "ct.nii"), ("ct.nii.gz", True, "ct.nii.gz"), ("ct.nrrd", False, "ct.nrrd"),
           ("ct.nrrd", True, "ct.nrrd"), ("ct.mha", False, "ct.mha"), ("ct.mha", True, "ct.mha"),
           ("ct.mhd", False, "ct.raw"), ("ct.mhd", True, "ct.zraw"), ("ct.nhdr", False, "ct.raw")]
FORMAT_IDS = [f"{name}{'-compressed' if z else ''}" for name, z, _ in FORMATS]


@pytest.fixture(scope="module")
def small_ct():
    image, _ = make_chest_phantom(shape_zyx=(16, 96, 96), spacing_zyx=(4.0, 3.6, 3.6))
    return image


def _write(folder, image, name, compressed):
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / name), useCompression=compressed)
    return folder / name


@pytest.mark.parametrize("name, compressed, data_file", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("keep", [0.3, 0.7, 0.999])
def test_truncated_file_of_every_format_is_refused(tmp_path, small_ct, name, compressed, data_file, keep):
    from COVIDLesionSegLib.errors import InputError
    from COVIDLesionSegLib.io import read_image

    path = _write(tmp_path, small_ct, name, compressed)
    data = (tmp_path / data_file).read_bytes()
    (tmp_path / data_file).write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match="truncated|damaged|cannot be read") as info:
        read_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name, compressed, data_file", [f for f in FORMATS if f[1]],
                         ids=[i for i, f in zip(FORMAT_IDS, FORMATS, strict=True) if f[1]])
def test_corrupted_compressed_file_is_refused(tmp_path, small_ct, name, compressed, data_file):
    """A flipped byte inside compressed pixel data breaks the stream's checksum: refuse, never read garbage.
    (Uncompressed formats carry no checksum; a flipped pixel byte there cannot be told from a real value.)"""
    from COVIDLesionSegLib.errors import InputError
    from COVIDLesionSegLib.io import read_image

    path = _write(tmp_path, small_ct, name, compressed)
    data = bytearray((tmp_path / data_file).read_bytes())
    for i in np.random.default_rng(3).integers(len(data) // 2, len(data) - 16, 40):
        data[i] ^= 0x5A
    (tmp_path / data_file).write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged|truncated|cannot be read"):
        read_image(path)


def test_intact_files_of_every_format_read_identically(tmp_path, small_ct):
    from COVIDLesionSegLib.io import read_image

    expected = sitk.GetArrayFromImage(small_ct)
    for k, (name, compressed, _) in enumerate(FORMATS):
        image, _ = read_image(_write(tmp_path / str(k), small_ct, name, compressed))
        assert np.array_equal(sitk.GetArrayFromImage(image), expected), FORMAT_IDS[k]


def _damage_end_slice(files, how):
    """Damage the file holding the series' last slice (the reader's gap check cannot see a lost end)."""
    reader = sitk.ImageFileReader()
    def z_of(f):
        reader.SetFileName(str(f))
        reader.ReadImageInformation()
        return float(reader.GetMetaData("0020|0032").split("\\")[2])
    last = max(files, key=z_of)
    data = last.read_bytes()
    if how == "truncated-pixels":
        last.write_bytes(data[: int(len(data) * 0.8)])
    elif how == "truncated-header":
        last.write_bytes(data[:300])
    else:  # zeroed header
        last.write_bytes(data[:140] + bytes(300) + data[440:])
    return last


@pytest.mark.parametrize("how", ["truncated-pixels", "truncated-header", "zeroed-header"])
def test_damaged_dicom_slice_is_refused_not_dropped(tmp_path, how):
    """GDCM silently leaves out a slice file it cannot read; the series then looks complete but is short."""
    from COVIDLesionSegLib.errors import InputError
    from COVIDLesionSegLib.io import read_image

    _ramp_series(tmp_path / "series", [2.5 * k for k in range(10)], "1.2.3.4.900")
    (tmp_path / "series" / "README.txt").write_text("exported by the PACS")   # not DICOM: ignored
    damaged = _damage_end_slice(sorted((tmp_path / "series").glob("*.dcm")), how)
    with pytest.raises(InputError, match="could not be read") as info:
        read_image(tmp_path / "series")
    assert damaged.name in str(info.value)


# ------------------------------------------------------------------------------ device notes (item 12)

def test_device_cuda_with_cpu_only_models_prints_a_note(tmp_path, capsys):
    from COVIDLesionSegLib.cli import main

    image, _ = make_chest_phantom(shape_zyx=(40, 96, 104), spacing_zyx=(6.0, 3.6, 3.4))
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(path))
    assert main(["segment", str(path), "-o", str(tmp_path / "cuda"), "--device", "cuda", "--quiet",
                 "--model", "hu-threshold"]) == 0
    err = capsys.readouterr().err
    note = [line for line in err.splitlines() if "--device cuda" in line]
    assert note and "hu-lungs" in note[0] and "hu-threshold" in note[0] and "CPU" in note[0], err
    import torch

    if not torch.cuda.is_available():
        # The default infection model is a network: a GPU that is not there is an error that says what to do.
        assert main(["segment", str(path), "-o", str(tmp_path / "nocuda"), "--device", "cuda", "--quiet"]) == 1
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["segment", str(path), "-o", str(tmp_path / "cpu"), "--device", "cpu", "--quiet",
                 "--lungs-only"]) == 0
    assert "--device cuda" not in capsys.readouterr().err


# ------------------------------------------------------------- evaluation in physical space (item 5)

def _truth_labelmap():
    # A coarse grid: the surface metrics (NSD, HD95) dominate the time and scale with the surface.
    image, truth = make_chest_phantom(shape_zyx=(20, 48, 52), spacing_zyx=(12.0, 7.2, 6.8))
    labels = np.zeros(truth["right_lung"].shape, np.uint8)
    labels[truth["right_lung"]] = 1
    labels[truth["left_lung"]] = 2
    labelmap = sitk.GetImageFromArray(labels)
    labelmap.CopyInformation(image)
    return labelmap


def test_evaluate_compares_in_physical_space_whatever_the_storage(tmp_path):
    """A reference stored in another axis order / flip, or cropped to its bounding box the way Slicer writes
    segmentations, is the same reference: perfect agreement with the prediction it was made from."""
    from COVIDLesionSegLib.evaluation import evaluate_files

    labelmap = _truth_labelmap()
    pred = tmp_path / "pred_labels.nii.gz"
    sitk.WriteImage(labelmap, str(pred))
    flipped = tmp_path / "ref_flipped.nrrd"
    sitk.WriteImage(sitk.DICOMOrient(labelmap, "RAI"), str(flipped))
    lungs = sitk.GetArrayFromImage(labelmap) > 0
    zs, ys, xs = (np.flatnonzero(lungs.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    cropped_image = labelmap[int(xs[0]):int(xs[-1]) + 1, int(ys[0]):int(ys[-1]) + 1, int(zs[0]):int(zs[-1]) + 1]
    cropped = tmp_path / "ref_cropped.nii.gz"
    sitk.WriteImage(cropped_image, str(cropped))
    for ref in (flipped, cropped):
        result = evaluate_files(pred, ref)
        assert set(result["segments"]) >= {"Right lung", "Left lung", "Lungs"}, ref
        for name, metrics in result["segments"].items():
            assert metrics["dsc"] == 1.0 and metrics["hd95"] == 0.0, (ref.name, name, metrics)


def test_evaluate_refuses_a_reference_on_another_grid(tmp_path):
    from COVIDLesionSegLib.errors import InputError
    from COVIDLesionSegLib.evaluation import evaluate_files

    labelmap = _truth_labelmap()
    pred = tmp_path / "pred_labels.nii.gz"
    sitk.WriteImage(labelmap, str(pred))
    shifted = sitk.Image(labelmap)
    shifted.SetOrigin([o + 0.5 * s for o, s in zip(labelmap.GetOrigin(), labelmap.GetSpacing(), strict=True)])
    ref = tmp_path / "ref_shifted.nii.gz"
    sitk.WriteImage(shifted, str(ref))
    with pytest.raises(InputError, match="grid.*resample"):
        evaluate_files(pred, ref)


# ------------------------------------------------- physically implausible inputs and scans without lungs

@pytest.mark.parametrize("scale, unit", [(1e-3, "metres"), (0.1, "centimetres"), (1000.0, "micrometres")])
def test_spacing_in_other_units_is_refused(scale, unit):
    """A header whose spacing is in metres/centimetres/micrometres gives a 0.4 mm or a 400 m "chest"; every
    volume in mL would be wrong by a factor of 1e3-1e9. Refused with the measured extent and the fix."""
    from COVIDLesionSegLib.checks import check_ct
    from COVIDLesionSegLib.errors import InputError

    image, _ = make_chest_phantom(shape_zyx=(20, 64, 64), spacing_zyx=(8.0, 5.0, 5.0))
    image.SetSpacing([s * scale for s in image.GetSpacing()])
    with pytest.raises(InputError, match="extent.*spacing"):
        check_ct(image)


def test_unit_spacing_is_noted():
    from COVIDLesionSegLib.checks import check_ct

    image, _ = make_chest_phantom(shape_zyx=(20, 64, 64), spacing_zyx=(8.0, 5.0, 5.0))
    image.SetSpacing((1.0, 1.0, 1.0))
    image = sitk.Resample(image, [320, 320, 20], sitk.Transform(), sitk.sitkNearestNeighbor, image.GetOrigin(),
                          (1.0, 1.0, 1.0))
    _, notes = check_ct(image)
    assert any("1 x 1 x 1 mm" in n for n in notes), notes


def test_scan_without_lungs_fails_as_an_input_problem(tmp_path, capsys):
    """A CT that passes the HU checks but shows no lungs (an abdomen) is the user's input problem: the batch
    reports the reason, not an "unexpected error: ValueError" as for a bug."""
    from COVIDLesionSegLib.cli import main

    image, _ = make_chest_phantom(shape_zyx=(40, 96, 104), spacing_zyx=(6.0, 3.6, 3.4))
    arr = sitk.GetArrayFromImage(image)
    body = arr > -500
    from scipy import ndimage
    filled = np.stack([ndimage.binary_fill_holes(s) for s in body])
    arr[filled & ~body] = 35              # lungs, airways and stomach gas become soft tissue
    abdomen = sitk.GetImageFromArray(arr)
    abdomen.CopyInformation(image)
    path = tmp_path / "abdomen.nii.gz"
    sitk.WriteImage(abdomen, str(path))
    assert main(["segment", str(path), "-o", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "no lungs found" in err and "unexpected error" not in err, err


# ------------------------------------------------------------------ inputs that hold no case

def test_segment_with_no_ct_in_the_inputs_is_an_error(tmp_path, capsys):
    """`segment` on a folder with nothing to segment used to print "0 of 0 case(s) segmented" and exit 0."""
    from COVIDLesionSegLib.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not a scan")
    assert main(["segment", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no CT files or DICOM series" in err and str(tmp_path / "in") in err


def test_nested_hospital_export_finds_every_series_folder(tmp_path):
    """PACS exports nest series folders in patient and study folders (export/patient/study/series). Image
    files count only in the folders given (a results folder inside would otherwise be read back as input)."""
    from COVIDLesionSegLib.io import expand_inputs

    for patient, series in (("p1", "1.2.3.4.1001"), ("p2", "1.2.3.4.1002")):
        _ramp_series(tmp_path / "export" / patient / "study1" / "CT", [2.5 * k for k in range(6)], series)
    (tmp_path / "export" / "p2" / "scan.nii.gz").write_bytes(b"")
    assert expand_inputs([str(tmp_path / "export")]) == [
        tmp_path / "export" / "p1" / "study1" / "CT", tmp_path / "export" / "p2" / "study1" / "CT"]


def test_nan_voxels_in_a_float_nifti_are_refused_not_read_as_zero(tmp_path):
    """Issue 11 item 2: ITK's NIfTI reader turns NaN into 0 HU, which a lung reads as infection; the raw data
    are checked. The same array as .mha was refused already (its reader keeps the NaN)."""
    import nibabel as nib

    from COVIDLesionSegLib.errors import InputError
    from COVIDLesionSegLib.io import read_image

    a = np.full((12, 24, 24), -800.0, dtype=np.float32)
    a[3:5, 5:10, 5:10] = np.nan
    for name in ("nan.nii.gz", "nan.nii"):
        nib.save(nib.Nifti1Image(a.transpose(2, 1, 0), np.eye(4)), str(tmp_path / name))
        with pytest.raises(InputError, match="50 NaN or infinite voxels"):
            read_image(tmp_path / name)
    clean = np.where(np.isnan(a), -700.0, a)
    nib.save(nib.Nifti1Image(clean.transpose(2, 1, 0), np.eye(4)), str(tmp_path / "clean.nii.gz"))
    read_image(tmp_path / "clean.nii.gz")   # a clean float file still reads


def test_input_window_accepts_the_negative_level_as_a_separate_argument(tmp_path, capsys):
    """Issue 11 item 11: `--input-window -600,1500` (the refusal message's own syntax) used to exit 2."""
    from COVIDLesionSegLib.cli import _join_negative_values, build_parser

    argv = _join_negative_values(["segment", "x.nii.gz", "-o", str(tmp_path), "--input-window", "-600,1500"])
    args = build_parser().parse_args(argv)
    assert tuple(args.input_window) == (-600.0, 1500.0)
    same = build_parser().parse_args(["segment", "x.nii.gz", "-o", str(tmp_path), "--input-window=-600,1500"])
    assert tuple(same.input_window) == tuple(args.input_window)
