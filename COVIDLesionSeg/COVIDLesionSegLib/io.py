"""Reading chest CT: NIfTI, NRRD, MHA/MHD files and DICOM series folders.

Geometry is kept exactly as stored (SimpleITK's LPS physical space); :class:`~.volume.CTVolume` then
reorients a copy for the algorithms and maps results back onto the input grid.

DICOM folders: every series in the folder (recursively) is listed in the run notes (number, description,
modality, slices, UID) with the one that was read: the CT volume with the most slices (localizers and
non-CT series such as the PET of a PET/CT come after). Slices are ordered by their position along the slice
normal (GDCM's sorter). A series with missing slices (a step of 1.5 nominal steps or more between two
slices) is refused, because a regular grid would put every slice after the gap at the wrong place, unless
the caller allows gaps: then the series is resampled onto a regular grid at the true slice positions, the
missing slices interpolated from their neighbours. A gantry tilt (slice positions not along the normal),
duplicate positions or uneven spacing without gaps are reported in ``CTVolume.notes``.
"""

from __future__ import annotations

import gzip
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from . import memory
from .errors import InputError

FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

# Largest volume read at all (voxels). 512 x 512 x 3050 slices is 1.6 GB as int16 and peaked at 4.4 GB with the
# default models (memory.py); anything larger is almost certainly not a single chest CT. Below it, a scan is
# read when it fits the free memory (memory.check_fits).
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

    A DICOM series folder is one case; any other folder contributes its image files and the DICOM series
    folders below it at any depth (hospital exports nest them as patient/study/series; hidden folders and
    symbolic links are not followed). Image files count only in the folders given, so that a results folder
    inside an input folder is not read back as input. A missing or unsupported file is kept: reading it
    later fails with the reason, as a failed case of the batch.
    """
    cases = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            if _looks_like_dicom_folder(path):
                cases.append(path)
                continue
            cases += [p for p in sorted(path.iterdir()) if p.is_file() and is_image_file(p)]
            cases += _dicom_series_folders(path)
        else:
            cases.append(path)  # a missing or unsupported file becomes a failed case with the reason
    unique, seen = [], set()
    for case in cases:
        key = str(case.resolve()) if case.exists() else str(case)
        if key not in seen:
            seen.add(key)
            unique.append(case)
    return unique


def _dicom_series_folders(top: Path) -> list[Path]:
    """DICOM series folders below ``top`` in sorted depth-first order; a series folder is not searched further."""
    found = []
    for directory, subdirs, _files in os.walk(top):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        if Path(directory) != top and _looks_like_dicom_folder(Path(directory)):
            found.append(Path(directory))
            subdirs[:] = []
    return found


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


def read_image(path: str | os.PathLike, allow_slice_gaps: bool = False) -> tuple[sitk.Image, list[str]]:
    """:func:`read_input` without the DICOM description: the image and the notes."""
    image, notes, _dicom = read_input(path, allow_slice_gaps)
    return image, notes


def read_input(path: str | os.PathLike,
               allow_slice_gaps: bool = False) -> tuple[sitk.Image, list[str], Optional["DicomSource"]]:
    """Read a CT image file or DICOM series folder without reorienting it.

    ``allow_slice_gaps``: a DICOM series with missing slices is refused unless this is true; then it (and a
    series with uneven spacing) is resampled onto a regular grid at its true slice positions.

    Returns:
        the image (pixels cast to int16 when the values fit, to halve memory for int32/float files), a list of
        notes for the user, and for a DICOM folder the :class:`DicomSource` it was read from (None for files).

    Raises:
        InputError: missing path, unsupported or unreadable file, no DICOM series, missing DICOM slices (without
            ``allow_slice_gaps``), too large a volume.
        memory.InsufficientMemoryError: the volume cannot be segmented in the free memory (from its header, before
            its pixels are read).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    dicom = None
    if p.is_dir():
        image, notes, dicom = _read_dicom_series(p, allow_slice_gaps)
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
        header = _header_fields(reader)
        # The integrity check decompresses the whole file as ITK's reader does: both run at once (zlib and
        # ITK release the GIL), so on two cores reading costs one decompression, not two.
        with ThreadPoolExecutor(max_workers=1) as pool:
            check = pool.submit(_check_complete, p, header)
            try:
                image = reader.Execute()
            except (RuntimeError, MemoryError) as exc:
                check.result()   # a truncated or damaged file gets its own message
                raise InputError(f"{p}: reading the image failed ({_first_line(exc)}); the file may be truncated") from None
            check.result()
        notes = []
    return _compact_pixels(image), notes, dicom


def _check_file_suffix(p: Path) -> None:
    name = p.name.lower()
    if name.endswith(".dcm") or name.endswith(".ima"):
        raise InputError(f"{p}: a single DICOM file; give the folder that holds the whole series instead")
    if not name.endswith(FILE_SUFFIXES):
        raise InputError(
            f"{p}: unsupported file type; use NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) "
            "or a DICOM series folder"
        )


def _header_fields(reader: sitk.ImageFileReader) -> dict[str, str]:
    """The header fields the integrity checks need, read before the pixels (the checks run beside ITK's
    reader, which must not be asked for its metadata while it reads)."""
    fields = {}
    for key in ("dim[0]", "bitpix", "vox_offset", "datatype") + tuple(f"dim[{k}]" for k in range(1, 8)):
        try:
            fields[key] = reader.GetMetaData(key)
        except RuntimeError:
            pass
    return fields


def _check_complete(p: Path, header: dict[str, str]) -> None:
    """Refuse a truncated or damaged file that ITK would read without an error.

    ITK's NIfTI reader fills a truncated file (plain or gzipped) with zeros, and its MetaImage reader returns
    garbage when the zlib data are corrupted (it only prints "Uncompress failed"); both would then be
    segmented as if they were real scans. So: a plain ``.nii`` must hold ``vox_offset`` + all voxels; a
    ``.nii.gz`` is decompressed once (gzip checks its CRC and length) and must hold as much; the zlib
    stream of a compressed MetaImage must decompress without error. NRRD needs nothing: ITK already
    refuses truncated and corrupted NRRD data. Uncompressed formats carry no checksum, so a flipped pixel
    byte there cannot be detected by anyone.
    """
    name = p.name.lower()
    problem = None
    try:
        if name.endswith((".nii", ".nii.gz")):
            needed = _nifti_bytes(header)
            have = _inflated_length(p) if name.endswith(".gz") else p.stat().st_size
            if have < needed:
                problem = f"truncated: it holds {have} bytes of the {needed} its header announces"
        elif name.endswith((".mha", ".mhd")):
            _check_metaimage_stream(p)
    except (OSError, EOFError, zlib.error) as exc:
        problem = f"damaged or truncated ({exc or type(exc).__name__})"
    if problem:
        raise InputError(f"{p}: the file is {problem}; copy or export it again")
    if name.endswith((".nii", ".nii.gz")):
        bad = _nifti_nonfinite_voxels(p, header)
        if bad:
            raise InputError(f"{p}: the image has {bad} NaN or infinite voxels (the NIfTI reader would turn them "
                             "into 0 HU, which reads as tissue); it is damaged or was exported incorrectly")


#: NIfTI datatype codes of floating-point voxels, with their numpy types.
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _nifti_nonfinite_voxels(p: Path, header: dict[str, str]) -> int:
    """NaN or infinite voxels in a floating-point NIfTI file, counted on the raw data.

    Why here: ITK's NIfTI reader replaces NaN by 0 (measured with SimpleITK 2.x), so the image it returns
    looks clean and the NaN check in ``checks.check_ct`` never fires. Integer files cannot hold NaN.
    """
    try:
        code = int(header["datatype"])
        offset = int(float(header["vox_offset"]))
    except (KeyError, ValueError):
        return 0
    kind = _NIFTI_FLOAT_TYPES.get(code)
    if kind is None:
        return 0
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    bad = 0
    with opener(p, "rb") as fh:
        head = fh.read(4)
        order = "<" if int.from_bytes(head, "little") == 348 else ">"   # sizeof_hdr tells the byte order
        fh.read(offset - 4)
        dtype = np.dtype(order + kind)
        rest = b""
        while chunk := fh.read(1 << 24):
            chunk = rest + chunk
            usable = len(chunk) - len(chunk) % dtype.itemsize
            bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk[:usable], dtype=dtype))))
            rest = chunk[usable:]
    return bad


def _nifti_bytes(header: dict[str, str]) -> int:
    """Bytes a NIfTI file must hold (``vox_offset`` + every voxel of every dimension), from its header."""
    try:
        dims = [int(header[f"dim[{k}]"]) for k in range(1, int(header["dim[0]"]) + 1)]
        return int(float(header["vox_offset"])) + (
            int(np.prod(dims, dtype=np.int64)) * int(header["bitpix"]) // 8)
    except (KeyError, ValueError):
        return 0   # the header fields are not exposed: nothing to compare with (the reader checks what it can)


def _inflated_length(source: Path, start: int = 0, wbits: int = 31) -> int:
    """Length of a gzip (``wbits`` 31) or zlib (15) stream once decompressed, read in chunks and thrown away.

    zlib checks the stream's checksum (gzip: CRC-32 and length) at its end and raises ``zlib.error`` on a
    damaged stream; a stream cut short raises EOFError. Concatenated gzip members are followed.
    """
    total, stream = 0, zlib.decompressobj(wbits)
    with open(source, "rb") as fh:
        fh.seek(start)
        while chunk := fh.read(1 << 22):
            while chunk:
                total += len(stream.decompress(chunk, 1 << 24))   # bounded output: pixels are never all held
                chunk = stream.unconsumed_tail
                if stream.eof and stream.unused_data and wbits == 31:
                    chunk, stream = stream.unused_data, zlib.decompressobj(wbits)
    if not stream.eof:
        raise EOFError("the compressed data end early")
    return total


def _check_metaimage_stream(p: Path) -> None:
    """Decompress the zlib pixel data of a compressed MetaImage (``CompressedData = True``) to verify it."""
    header: dict[str, str] = {}
    offset = 0
    with open(p, "rb") as fh:
        for _line in range(200):   # a MetaImage header is a few dozen "Key = value" lines; ITK has parsed it already
            raw = fh.readline(1 << 16)
            if not raw:
                break
            offset += len(raw)
            key, _, value = raw.decode("latin-1").partition("=")
            header[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                break
    if header.get("compresseddata", "").lower() != "true":
        return
    data_file = header.get("elementdatafile", "")
    if data_file.upper() == "LOCAL":
        source, start = p, offset
    elif data_file and " " not in data_file and "%" not in data_file and data_file.upper() != "LIST":
        source, start = p.parent / data_file, 0   # one external .zraw file (lists and patterns: not checked)
    else:
        return
    _inflated_length(source, start, wbits=15)


def _check_size(where, size) -> None:
    n = int(np.prod([int(s) for s in size], dtype=np.int64))
    if n == 0:
        raise InputError(f"{where}: the image is empty (size {tuple(size)})")
    if n > MAX_VOXELS:
        raise InputError(
            f"{where}: {tuple(size)} is {n / 1e6:.0f} million voxels, more than the {MAX_VOXELS / 1e6:.0f} million "
            "this tool reads at once; crop the scan to the chest or resample it to thicker slices first"
        )
    memory.check_fits(where, size)   # before the pixels are read: a scan that cannot fit is refused, not killed


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


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder: what the run notes say about it."""

    uid: str
    files: tuple[str, ...]
    number: str = ""          # SeriesNumber (0020,0011)
    description: str = ""     # SeriesDescription (0008,103E)
    modality: str = ""        # Modality (0008,0060)
    localizer: bool = False   # ImageType (0008,0008) says LOCALIZER (a scout / topogram)
    folder: str = ""          # where its files are, relative to the folder given

    def label(self) -> str:
        number = f"series {self.number} " if self.number else "series "
        description = f'"{self.description}" ' if self.description else ""
        kind = ", ".join(k for k in (self.modality, "localizer" if self.localizer else "") if k)
        where = f", in {self.folder}" if self.folder not in ("", ".") else ""
        count = f"{len(self.files)} slice{'s' if len(self.files) != 1 else ''}"
        return f"{number}{description}({', '.join(x for x in (kind, count) if x)}{where}, UID {self.uid})"


#: Header fields a :class:`DicomSource` keeps (DICOM keyword -> tag as GDCM names it), for the report's
#: identifiers and the quality checks.
HEADER_TAGS = {
    "PatientName": "0010|0010", "PatientID": "0010|0020", "PatientBirthDate": "0010|0030", "PatientSex": "0010|0040",
    "StudyDate": "0008|0020", "StudyTime": "0008|0030", "AccessionNumber": "0008|0050",
    "StudyDescription": "0008|1030", "SeriesDescription": "0008|103e", "SeriesNumber": "0020|0011",
    "Modality": "0008|0060", "Manufacturer": "0008|0070", "InstitutionName": "0008|0080",
    "StudyInstanceUID": "0020|000d", "SeriesInstanceUID": "0020|000e", "FrameOfReferenceUID": "0020|0052",
    "SliceThickness": "0018|0050", "ContrastBolusAgent": "0018|0010", "GantryDetectorTilt": "0018|1120",
    "ConvolutionKernel": "0018|1210", "KVP": "0018|0060",
}


@dataclass(frozen=True)
class DicomSource:
    """The DICOM series a volume was read from, for the quality checks, the report and the DICOM SEG/SR.

    Attributes:
        folder: the folder given.
        series: the series that was read.
        files: its files in the order of the image's slices (slice k of the image is ``files[k]``).
        resampled: the series was resampled onto its true slice positions (``allow_slice_gaps``); its slices
            then no longer correspond to the files one to one.
        tilt_deg: gantry tilt found from the slice positions (0 when none).
        uneven_spacing: the slice steps differ from each other (without or with gaps).
        geometry_notes: the notes about tilt, duplicates and spacing, as given to the user.
        header: the first slice's :data:`HEADER_TAGS` that are present (strings, as stored).
    """

    folder: str
    series: DicomSeries
    files: tuple[str, ...]
    resampled: bool = False
    tilt_deg: float = 0.0
    uneven_spacing: bool = False
    geometry_notes: tuple[str, ...] = ()
    header: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """The JSON form (``input.dicom`` of a case report): UIDs, counts and the header fields."""
        return {"series_instance_uid": self.series.uid, "files": len(self.files), "resampled": self.resampled,
                "gantry_tilt_deg": round(self.tilt_deg, 3), "uneven_spacing": self.uneven_spacing,
                "header": dict(self.header)}


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """:data:`HEADER_TAGS` of one DICOM file (without its pixels), by keyword; absent tags are left out."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {}
    return {keyword: reader.GetMetaData(tag).strip() for keyword, tag in HEADER_TAGS.items()
            if reader.HasMetaDataKey(tag) and reader.GetMetaData(tag).strip()}


def find_dicom_series(folder: Path) -> list[DicomSeries]:
    """Every DICOM series under ``folder`` (recursively), each with its slices sorted by GDCM along the
    slice normal, in the order the reader prefers them (see :func:`_preference`)."""
    files_of: dict[str, tuple[str, ...]] = {}
    where: dict[str, str] = {}
    for directory, _subdirs, _files in os.walk(folder):
        for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory) or ():
            files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, sid))
            if len(files) > len(files_of.get(sid, ())):
                files_of[sid] = files
                where[sid] = os.path.relpath(directory, folder)
    found = []
    reader = sitk.ImageFileReader()
    for sid, files in files_of.items():
        tags = {}
        reader.SetFileName(files[0])
        try:
            reader.ReadImageInformation()
            tags = {key: reader.GetMetaData(key).strip() for key in ("0020|0011", "0008|103e", "0008|0060", "0008|0008")
                    if reader.HasMetaDataKey(key)}
        except RuntimeError:
            pass  # an unreadable first slice: the series is still listed, reading it reports the error
        found.append(DicomSeries(uid=sid, files=files, number=tags.get("0020|0011", ""),
                                 description=tags.get("0008|103e", ""), modality=tags.get("0008|0060", "").upper(),
                                 localizer="LOCALIZER" in tags.get("0008|0008", "").upper(), folder=where[sid]))
    return sorted(found, key=_preference)


def _check_no_dropped_files(folder: Path, found: list[DicomSeries], chosen: DicomSeries) -> None:
    """Refuse a folder holding DICOM files that GDCM left out of every series because it could not read them.

    GDCM skips a damaged or truncated slice file without a word; when it held the first or last slice the
    series still looks complete and the scan is silently shorter. A file left out is a problem when its
    header cannot be read at all (it may have been any slice) or when it belongs to the series being read.
    Other DICOM objects that are not images (a DICOMDIR, a report of another series) are left alone.
    """
    listed = {os.path.normcase(os.path.abspath(f)) for s in found for f in s.files}
    unread = []
    reader = sitk.ImageFileReader()
    for directory, _subdirs, names in os.walk(folder):
        for name in sorted(names):
            path = Path(directory) / name
            if name.upper() == "DICOMDIR" or name.startswith(".") or not _is_dicom_file(path):
                continue
            if os.path.normcase(os.path.abspath(path)) in listed:
                continue
            reader.SetFileName(str(path))
            try:
                reader.ReadImageInformation()
                same_series = reader.HasMetaDataKey("0020|000e") and \
                    reader.GetMetaData("0020|000e").strip() == chosen.uid
            except RuntimeError:
                same_series = True   # unreadable: it may be any slice of the series
            if same_series:
                unread.append(os.path.relpath(path, folder))
    if unread:
        shown = ", ".join(unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
        raise InputError(f"{folder}: {len(unread)} DICOM file(s) could not be read (damaged or truncated): {shown}. "
                         "The series would be incomplete; copy or export it again, or remove the files if they "
                         "do not belong to this scan")


def _preference(series: DicomSeries) -> tuple:
    """Volumes first (2+ slices, not a localizer), CT before other modalities (a PET/CT export holds both),
    then the most slices; the UID breaks ties so the choice never depends on the file system's order."""
    volume = len(series.files) >= 2 and not series.localizer
    return (not volume, series.modality not in ("CT", ""), -len(series.files), series.uid)


def _read_dicom_series(folder: Path, allow_slice_gaps: bool = False) -> tuple[sitk.Image, list[str], DicomSource]:
    found = find_dicom_series(folder)
    if not found:
        raise InputError(f"{folder}: no DICOM series found in this folder (or its subfolders)")
    chosen = found[0]
    notes: list[str] = []
    if len(found) > 1:
        notes.append(f"{len(found)} DICOM series in the folder: " + "; ".join(s.label() for s in found))
        notes.append(f"used DICOM {chosen.label()}: the CT volume with the most slices; to segment another "
                     "series, give a folder that holds only that series")
    if len(chosen.files) < 2:
        raise InputError(f"{folder}: the largest DICOM series has a single slice; a 3D CT series is needed")
    _check_no_dropped_files(folder, found, chosen)
    files = chosen.files
    geometry = _slice_geometry(files)
    notes.extend(geometry.notes)
    if geometry.missing_slices and not allow_slice_gaps:
        raise InputError(f"{folder}: {geometry.gap_text()}. Volumes and masks would be wrong on a regular grid. "
                         "Re-export the complete series, or accept interpolated slices in the gaps "
                         "(command line and batch.py: --allow-slice-gaps)")

    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    first.ReadImageInformation()
    _check_size(folder, tuple(first.GetSize()[:2]) + (len(files),))

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: reading DICOM series {chosen.uid} failed ({_first_line(exc)})") from None
    resampled = bool(allow_slice_gaps and geometry.irregular)
    if resampled:
        image = _onto_true_positions(image, geometry)
        notes.append(f"slice spacing was irregular ({geometry.gap_text() if geometry.missing_slices else 'uneven'}); "
                     f"the series was resampled onto {image.GetSize()[2]} slices {geometry.step:.3f} mm apart at the "
                     f"true slice positions, {geometry.missing_slices} missing slice(s) interpolated linearly "
                     "from their neighbours")
    source = DicomSource(folder=str(folder), series=chosen, files=tuple(files), resampled=resampled,
                         tilt_deg=geometry.tilt_deg, uneven_spacing=geometry.irregular,
                         geometry_notes=tuple(geometry.notes), header=read_header(files[0]))
    return image, notes, source


@dataclass
class _SliceGeometry:
    """Slice positions of a sorted series along its normal (mm) and what they say about the grid."""

    along: Optional[np.ndarray] = None   # position of each slice along the slice normal, in file order
    step: float = 0.0                    # nominal slice step: the median of the non-zero steps
    missing_slices: int = 0              # slices that would fill the gaps (steps of 1.5 nominal steps or more)
    largest_gap: tuple[float, float] = (0.0, 0.0)
    irregular: bool = False              # steps differ from the nominal one (gaps or uneven spacing)
    tilt_deg: float = 0.0                # gantry tilt: angle between the slice normal and the slices' path
    notes: list[str] = field(default_factory=list)

    def gap_text(self) -> str:
        lo, hi = self.largest_gap
        return (f"{self.missing_slices} missing slice(s) in the DICOM series: the slice positions jump from "
                f"{lo:.1f} to {hi:.1f} mm (largest gap) while the other slices are {self.step:.3f} mm apart")


def _slice_geometry(files) -> _SliceGeometry:
    """Gantry tilt, duplicate positions, uneven spacing and missing slices from ImagePositionPatient /
    ImageOrientationPatient of each slice."""
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
            return _SliceGeometry(notes=["slice positions could not be read from the DICOM headers; geometry not "
                                         "verified"])
    if orientation is None or len(positions) < 2:
        return _SliceGeometry()
    row, col = np.array(orientation[:3]), np.array(orientation[3:6])
    normal = np.cross(row, col)
    pos = np.array(positions)
    along = pos @ normal
    if along[-1] < along[0]:
        along = -along  # measured in the direction the sorted slices run, so the steps are positive
    steps = np.diff(along)
    out = _SliceGeometry(along=along)
    if np.any(np.abs(steps) < 1e-3):
        out.notes.append("some DICOM slices share the same position (duplicates or several acquisitions)")
    moving = np.abs(steps)[np.abs(steps) >= 1e-3]
    if moving.size:
        step = float(np.median(moving))
        out.step = step
        out.irregular = float(np.max(np.abs(moving - step))) > 0.01 * step + 1e-3
        gaps = np.nonzero(np.abs(steps) >= 1.5 * step)[0]
        if gaps.size:
            out.missing_slices = int(sum(round(abs(float(steps[i])) / step) - 1 for i in gaps))
            widest = int(gaps[np.argmax(np.abs(steps[gaps]))])
            out.largest_gap = (float(along[widest]), float(along[widest + 1]))
        elif out.irregular:
            out.notes.append(f"uneven slice spacing: {np.min(moving):.3f} to {np.max(moving):.3f} mm (volumes assume "
                             f"{float(np.mean(np.abs(steps))):.3f} mm; --allow-slice-gaps resamples onto the true "
                             "positions)")
    offsets = pos[-1] - pos[0]
    if np.linalg.norm(offsets) > 0:
        cos_angle = abs(float(offsets @ normal)) / float(np.linalg.norm(offsets))
        tilt = float(np.degrees(np.arccos(min(1.0, cos_angle))))
        if tilt > 0.1:
            out.tilt_deg = tilt
            out.notes.append(f"gantry tilt of {tilt:.1f} degrees: slices are sheared, the voxel grid is approximate")
    return out


def _onto_true_positions(image: sitk.Image, geometry: _SliceGeometry) -> sitk.Image:
    """Resample a series read slice after slice onto a regular grid at its true slice positions.

    The series reader stacks the slices as if they were ``spacing`` apart; here every output slice k lies at
    ``along[0] + k * step`` and is interpolated linearly (along the normal) between the two read slices
    around it, so a missing slice is filled from its neighbours and the present ones are kept as they are.
    Slices at a duplicated position are ignored after the first.
    """
    along = geometry.along
    keep = np.concatenate([[True], np.diff(along) >= 1e-3])
    along = along[keep]
    source = sitk.GetArrayViewFromImage(image)
    count = int(round((along[-1] - along[0]) / geometry.step)) + 1
    _check_size("the series resampled onto its slice positions", tuple(image.GetSize()[:2]) + (count,))
    targets = along[0] + geometry.step * np.arange(count)
    upper = np.clip(np.searchsorted(along, targets, side="right"), 1, along.size - 1)
    lower = upper - 1
    weight = np.clip((targets - along[lower]) / (along[upper] - along[lower]), 0.0, 1.0).astype(np.float32)
    rows = np.flatnonzero(keep)   # index in the read image of each kept position
    out = np.empty((count,) + source.shape[1:], dtype=source.dtype)
    for k in range(count):
        a, b, w = source[rows[lower[k]]], source[rows[upper[k]]], weight[k]
        if w == 0.0 or w == 1.0:
            out[k] = a if w == 0.0 else b   # a slice at its true position is copied bit for bit
            continue
        mixed = (1.0 - w) * a.astype(np.float32) + w * b.astype(np.float32)
        out[k] = np.round(mixed) if np.issubdtype(out.dtype, np.integer) else mixed
    result = sitk.GetImageFromArray(out)
    result.SetSpacing(tuple(image.GetSpacing()[:2]) + (geometry.step,))
    result.SetOrigin(image.GetOrigin())
    result.SetDirection(image.GetDirection())
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    meaningful = [line for line in text if line.strip() and not line.startswith("sitk::ERROR") ] or text or [""]
    return meaningful[-1][:300]
