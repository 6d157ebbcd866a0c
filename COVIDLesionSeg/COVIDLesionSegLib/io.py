"""Reading chest CT: NIfTI, NRRD, MHA/MHD files and DICOM series folders.

Geometry is kept exactly as stored (SimpleITK's LPS physical space); :class:`~.volume.CTVolume` then
reorients a copy for the algorithms and maps results back onto the input grid.

DICOM folders: every series in the folder (recursively) is listed, the one with the most slices is read,
slices are ordered by their position along the slice normal (GDCM's sorter), and the reader reports in
``CTVolume.notes`` a gantry tilt (slice positions not along the normal) or uneven slice spacing, both of
which make a regular voxel grid an approximation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

# Largest volume read at all (voxels). 512 x 512 x 3000 slices is about 1.6 GB as int16; anything larger
# is almost certainly not a single chest CT and would not fit the pipeline's working memory.
MAX_VOXELS = 800_000_000


def case_name(path: str | os.PathLike) -> str:
    """Output base name of a case: the file name without its image suffix, or the DICOM folder's name."""
    p = Path(path)
    name = p.name
    for suffix in (".seg.nrrd",) + FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "case"
    return name or "case"


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(FILE_SUFFIXES) and not name.endswith(".seg.nrrd")


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry "DICM" after a 128-byte preamble; names say nothing (CT.1.2.840...)."""
    if path.suffix.lower() in (".dcm", ".ima"):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _looks_like_dicom_folder(folder: Path) -> bool:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files or any(is_image_file(p) for p in files):
        return False
    return any(_is_dicom_file(p) for p in files[:20])  # a few files tell; a series has hundreds


def expand_inputs(inputs) -> list[Path]:
    """Expand command-line inputs into cases, in a stable order, without duplicates.

    A DICOM series folder is one case; any other folder contributes its image files and its DICOM series
    subfolders (one level down, so a hospital export of one folder per patient works). A missing or
    unsupported file is kept: reading it later fails with the reason, as a failed case of the batch.
    """
    cases = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            if _looks_like_dicom_folder(path):
                cases.append(path)
                continue
            children = sorted(path.iterdir())
            cases += [p for p in children if p.is_file() and is_image_file(p)]
            cases += [p for p in children if p.is_dir() and _looks_like_dicom_folder(p)]
        else:
            cases.append(path)  # a missing or unsupported file becomes a failed case with the reason
    unique, seen = [], set()
    for case in cases:
        key = str(case.resolve()) if case.exists() else str(case)
        if key not in seen:
            seen.add(key)
            unique.append(case)
    return unique


def unique_case_names(cases) -> list[str]:
    """Output base names for the cases, with _2, _3... where two inputs share a name."""
    names, used = [], set()
    for case in cases:
        base = case_name(case)
        name, k = base, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def read_image(path: str | os.PathLike) -> tuple[sitk.Image, list[str]]:
    """Read a CT image file or DICOM series folder without reorienting it.

    Returns:
        the image (pixels cast to int16 when the values fit, to halve memory for int32/float files) and a list of
        notes for the user.

    Raises:
        InputError: missing path, unsupported or unreadable file, no DICOM series, too large a volume.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        image, notes = _read_dicom_series(p)
    else:
        _check_file_suffix(p)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(
                f"{p}: cannot be read as an image ({_first_line(exc)}). Is it a complete NIfTI/NRRD/MHA file? "
                "A DICOM series must be given as its folder."
            ) from None
        _check_size(p, reader.GetSize())
        try:
            image = reader.Execute()
        except (RuntimeError, MemoryError) as exc:
            raise InputError(f"{p}: reading the image failed ({_first_line(exc)}); the file may be truncated") from None
        notes = []
    return _compact_pixels(image), notes


def _check_file_suffix(p: Path) -> None:
    name = p.name.lower()
    if name.endswith(".dcm") or name.endswith(".ima"):
        raise InputError(f"{p}: a single DICOM file; give the folder that holds the whole series instead")
    if not name.endswith(FILE_SUFFIXES):
        raise InputError(
            f"{p}: unsupported file type; use NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) "
            "or a DICOM series folder"
        )


def _check_size(where, size) -> None:
    n = int(np.prod([int(s) for s in size], dtype=np.int64))
    if n == 0:
        raise InputError(f"{where}: the image is empty (size {tuple(size)})")
    if n > MAX_VOXELS:
        raise InputError(
            f"{where}: {tuple(size)} is {n / 1e6:.0f} million voxels, more than the {MAX_VOXELS / 1e6:.0f} million "
            "this tool reads at once; crop the scan to the chest or resample it to thicker slices first"
        )


def _compact_pixels(image: sitk.Image) -> sitk.Image:
    """Cast to int16 when every value is an integer in int16 range (HU always is); keeps float otherwise."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        return image  # a colour/vector image: checks.py rejects it with a clear message
    pixel = image.GetPixelID()
    if pixel in (sitk.sitkInt16, sitk.sitkUInt8, sitk.sitkInt8):
        return image
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    lo, hi = stats.GetMinimum(), stats.GetMaximum()
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -32768 or hi > 32767:
        return image
    if pixel in (sitk.sitkFloat32, sitk.sitkFloat64):
        # Only cast when the floats are whole numbers (a HU volume saved as float); a rescaled or smoothed
        # float volume keeps its precision.
        arr = sitk.GetArrayViewFromImage(image)
        step = max(1, arr.size // 2_000_000)
        sample = arr.reshape(-1)[::step]
        if not np.all(np.isfinite(sample)) or not np.array_equal(sample, np.round(sample)):
            return image
    return sitk.Cast(image, sitk.sitkInt16)


def _read_dicom_series(folder: Path) -> tuple[sitk.Image, list[str]]:
    series: dict[str, tuple[str, ...]] = {}
    for directory, _subdirs, _files in os.walk(folder):
        for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory) or ():
            files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, sid))
            if len(files) > len(series.get(sid, ())):
                series[sid] = files
    if not series:
        raise InputError(f"{folder}: no DICOM series found in this folder (or its subfolders)")
    notes: list[str] = []
    if len(series) > 1:
        sizes = ", ".join(f"{len(f)} slices" for f in sorted(series.values(), key=len, reverse=True))
        notes.append(f"{len(series)} DICOM series in the folder ({sizes}); the largest was read")
    sid, files = max(series.items(), key=lambda kv: len(kv[1]))
    if len(files) < 2:
        raise InputError(f"{folder}: the largest DICOM series has a single slice; a 3D CT series is needed")
    notes.extend(_slice_geometry_notes(files))

    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    first.ReadImageInformation()
    _check_size(folder, tuple(first.GetSize()[:2]) + (len(files),))

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: reading DICOM series {sid} failed ({_first_line(exc)})") from None
    return image, notes


def _slice_geometry_notes(files) -> list[str]:
    """Gantry tilt and uneven spacing from ImagePositionPatient / ImageOrientationPatient of each slice."""
    positions, orientation = [], None
    reader = sitk.ImageFileReader()
    for f in files:
        reader.SetFileName(f)
        try:
            reader.ReadImageInformation()
            positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
            if orientation is None:
                orientation = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
        except (RuntimeError, ValueError):
            return ["slice positions could not be read from the DICOM headers; geometry not verified"]
    if orientation is None or len(positions) < 2:
        return []
    row, col = np.array(orientation[:3]), np.array(orientation[3:6])
    normal = np.cross(row, col)
    pos = np.array(positions)
    along = pos @ normal
    steps = np.diff(along)
    notes = []
    if np.any(np.abs(steps) < 1e-3):
        notes.append("some DICOM slices share the same position (duplicates or several acquisitions)")
    mean_step = float(np.mean(np.abs(steps)))
    if mean_step > 0 and float(np.max(np.abs(np.abs(steps) - mean_step))) > 0.01 * mean_step + 1e-3:
        notes.append(
            f"uneven slice spacing: {np.min(np.abs(steps)):.3f} to {np.max(np.abs(steps)):.3f} mm "
            f"(volumes assume {mean_step:.3f} mm)"
        )
    offsets = pos[-1] - pos[0]
    if np.linalg.norm(offsets) > 0:
        cos_angle = abs(float(offsets @ normal)) / float(np.linalg.norm(offsets))
        tilt = float(np.degrees(np.arccos(min(1.0, cos_angle))))
        if tilt > 0.1:
            notes.append(f"gantry tilt of {tilt:.1f} degrees: slices are sheared, the voxel grid is approximate")
    return notes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    meaningful = [line for line in text if line.strip() and not line.startswith("sitk::ERROR") ] or text or [""]
    return meaningful[-1][:300]
