"""One browser session's files, without trame: uploads, the ``--data`` folder, the outputs to download.

Everything a session writes is inside its own temporary folder (``uploads/`` and ``outputs/``), removed when
the session ends (:meth:`WebSession.close`). Every upload goes into a new numbered sub-folder, so nothing
the user uploaded is ever overwritten, and the ``--data`` folder is only read. Uploads are size-limited while
they are received (the limit also holds for what a zipped DICOM series expands to).

Reading goes through :func:`~COVIDLesionSegLib.checks.load_volume`, the one path every entry point takes, so the
page refuses what the command line refuses, with the same message (:func:`~COVIDLesionSegLib.worker.classify_error`,
as the Slicer module shows it).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from ..errors import InputError

#: Default upload limit (a 512 x 512 x 1000 int16 CT is 524 MB uncompressed).
DEFAULT_MAX_UPLOAD_MB = 2048

#: What the upload field accepts (the engine's readers; a DICOM series as one .zip).
UPLOAD_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".zip")


class UploadTooLarge(InputError):
    """An upload (or the archive's contents) over the server's limit."""


def _safe_name(name: str) -> str:
    """A file name without folders or odd characters (the browser's name is not trusted)."""
    base = Path(name.replace("\\", "/")).name
    base = re.sub(r"[^A-Za-z0-9._ -]+", "_", base).strip(" .")
    return base or "upload"


class WebSession:
    """The files of one session (see the module docstring)."""

    def __init__(self, data_dir: Optional[str | Path] = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
                 root: Optional[str | Path] = None):
        self.data_dir = Path(data_dir).resolve() if data_dir else None
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        if root is not None:
            Path(root).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="covidlesionseg-web-", dir=root))
        self.uploads = self.folder / "uploads"
        self.outputs = self.folder / "outputs"
        self._count = 0

    # -- inputs --------------------------------------------------------------------------------------------------
    def data_choices(self) -> list[str]:
        """The cases of the ``--data`` folder (files and DICOM series folders), relative to it."""
        from ..io import expand_inputs

        if self.data_dir is None or not self.data_dir.is_dir():
            return []
        # Only what the folder lists (a file there may be a link to elsewhere: the folder is the admin's choice).
        return [p.relative_to(self.data_dir).as_posix() for p in expand_inputs([self.data_dir])]

    def data_path(self, choice: str) -> Path:
        """The ``--data`` case named ``choice`` (one of :meth:`data_choices`; nothing outside the folder)."""
        if self.data_dir is None or choice not in self.data_choices():
            raise InputError(f"{choice}: not one of the cases of the data folder")
        return self.data_dir / choice

    def _new_folder(self, parent: Path) -> Path:
        self._count += 1
        folder = parent / f"{self._count:03d}"
        folder.mkdir(parents=True, exist_ok=False)
        return folder

    def open_upload(self, filename: str) -> "UploadWriter":
        """Start receiving an upload into a new folder (its name checked first; see :class:`UploadWriter`)."""
        name = _safe_name(filename)
        if not name.lower().endswith(UPLOAD_SUFFIXES):
            raise InputError(f"{name}: not a file the segmentation can read; upload a NIfTI (.nii, .nii.gz), NRRD "
                             "(.nrrd), MetaImage (.mha) file or a DICOM series as one .zip")
        return UploadWriter(self._new_folder(self.uploads) / name, self.max_upload_bytes)

    def receive(self, filename: str, chunks: Iterable[bytes]) -> Path:
        """Write a whole upload (its bytes in chunks); refuses it past the size limit."""
        writer = self.open_upload(filename)
        for chunk in chunks:
            writer.write(chunk)
        return writer.close()

    def prepare(self, path: Path) -> Path:
        """What to read for an upload: the file, or for a ``.zip`` the folder its DICOM files expand to."""
        if path.suffix.lower() != ".zip":
            return path
        target = path.parent / (path.stem + "_dicom")
        try:
            with zipfile.ZipFile(path) as archive:
                members = [m for m in archive.infolist() if not m.is_dir()]
                if sum(m.file_size for m in members) > self.max_upload_bytes:
                    raise UploadTooLarge(f"{path.name}: its contents are larger than this server's limit of "
                                         f"{self.max_upload_bytes // (1024 * 1024)} MB")
                for index, member in enumerate(members):
                    # Flattened under fresh names: no path in the archive can point outside the target folder.
                    out = target / f"{index:05d}_{_safe_name(member.filename)}"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except zipfile.BadZipFile as exc:
            raise InputError(f"{path.name}: not a readable zip archive ({exc}); zip the DICOM series folder "
                             "again") from exc
        if not target.is_dir():
            raise InputError(f"{path.name}: the archive holds no files")
        return target

    @staticmethod
    def load(path: Path, name: Optional[str] = None):
        """Read and check an input as the command line does; returns the engine's ``CTVolume``."""
        from ..checks import load_volume

        return load_volume(path, name=name)

    # -- outputs -------------------------------------------------------------------------------------------------
    def new_output_folder(self) -> Path:
        """A fresh folder for one set of downloads (earlier ones stay as they were)."""
        return self._new_folder(self.outputs)

    def output_file(self, relative: str) -> Optional[Path]:
        """A file written into :attr:`outputs` (for the download route), or None for anything else."""
        path = (self.outputs / relative).resolve()
        if not path.is_relative_to(self.outputs.resolve()) or not path.is_file():
            return None
        return path

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class UploadWriter:
    """Writes an upload chunk by chunk; past the size limit it removes what it wrote and raises
    :class:`UploadTooLarge`."""

    def __init__(self, path: Path, limit: int):
        self.path, self.limit, self.size = path, limit, 0
        self._fh = open(path, "wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            self._fh.close()
            shutil.rmtree(self.path.parent, ignore_errors=True)
            raise UploadTooLarge(f"{self.path.name}: the upload is larger than this server's limit of "
                                 f"{self.limit // (1024 * 1024)} MB (covidlesionseg serve --max-upload-mb)")
        self._fh.write(chunk)

    def close(self) -> Path:
        self._fh.close()
        return self.path


def write_outputs(folder: Path, volume_node, segmentation_node, table_node, report: dict[str, Any],
                  case: str, with_report: bool = True) -> dict[str, Path]:
    """The downloads of a result in the scene, as the command line names them: ``<case>.seg.nrrd``,
    ``<case>_labels.nii.gz``, ``<case>.json``, ``<case>_results.csv`` (the results table) and the case report
    (PDF and HTML). Returns kind -> path."""
    from .. import mrml, outputs, reports
    from ..segments import SEGMENTS
    from ..volume import Geometry

    paths = {"segmentation": folder / f"{case}.seg.nrrd", "labelmap": folder / f"{case}_labels.nii.gz",
             "json": folder / f"{case}.json", "csv": folder / f"{case}_results.csv"}
    mrml.save_segmentation(segmentation_node, paths["segmentation"])
    masks = mrml.masks_from_segmentation(segmentation_node, volume_node)
    image = mrml.image_from_volume_node(volume_node)
    shape = next(iter(masks.values())).shape if masks else image.GetSize()[::-1]
    empty = np.zeros(shape, bool)

    labels = outputs.compose_labelmap(masks.get(SEGMENTS.right_lung.name, empty),
                                      masks.get(SEGMENTS.left_lung.name, empty),
                                      masks.get(SEGMENTS.infection.name, empty))
    outputs.write_labelmap(paths["labelmap"], labels, Geometry.of(image))
    outputs.write_json_report(paths["json"], report)
    mrml.write_table_csv(table_node, paths["csv"])
    if with_report:
        report_paths = outputs.case_report_paths(folder, case)
        # The segments and the CT read above, not read from the scene a second time.
        reports.write_case_report_from_masks(report_paths["pdf_report"], report_paths["html_report"], report, image,
                                             masks)
        paths["pdf"] = report_paths["pdf_report"]
        paths["html"] = report_paths["html_report"]
    return paths
