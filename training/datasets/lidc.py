"""LIDC-IDRI: CT DICOM series with the four readers' XML annotations -> nodule consensus masks.

Layout (TCIA's download)::

    ROOT/LIDC-IDRI-0001/<study>/<series>/*.dcm    the CT series
    ROOT/LIDC-IDRI-0001/<study>/<series>/069.xml  the readers' annotations of that series

The XML (``LidcReadMessage``) holds one ``readingSession`` per reader; each ``unblindedReadNodule`` has
``roi`` elements, one per slice, with ``imageZposition`` (mm, the slice's z position), ``imageSOP_UID``,
``inclusion`` (``TRUE``: the contour outlines nodule; ``FALSE``: it outlines a hole to exclude) and the
contour as ``edgeMap`` points (``xCoord`` = column, ``yCoord`` = row, pixel indices). Nodules < 3 mm are
marked by a single point per slice and have no outline; like nCoVSegNet (003) and the shared
``lidc_0001_nodules`` mask, they are left out unless ``include_small``.

Consensus (003: "each lung nodule is marked by four doctors, we take a 50% consensus"): each reader's
nodules are rasterised per slice (polygon interior plus the contour pixels; an exclusion removes the pixels
strictly inside its outline), a voxel's reader count is the number of readers whose mask contains it,
and the consensus keeps voxels marked by at least ``min_readers`` (2 of 4). Counting voxels per reader this way equals pylidc-style clustering
followed by a 50 % vote whenever different nodules do not touch, and needs no matching heuristic.
Chest X-ray XMLs (``IdriReadMessage``) in the same collection are skipped.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from skimage.draw import polygon, polygon_perimeter

from COVIDLesionSegLib.io import read_image

from .base import Case, DatasetError, LabelRef, require

SOURCE = "lidc"
LAYOUT = """  ROOT/LIDC-IDRI-<nnnn>/<study>/<series>/*.dcm  (the CT series)
  ROOT/LIDC-IDRI-<nnnn>/<study>/<series>/*.xml  (LidcReadMessage reader annotations, beside the DICOMs)"""


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(elem: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in elem if _local(c.tag) == name]


def _text(elem: ET.Element, name: str, default: str | None = None) -> str | None:
    for c in elem:
        if _local(c.tag) == name:
            return (c.text or "").strip()
    return default


@dataclass
class Roi:
    z: float
    sop_uid: str
    inclusion: bool
    points: np.ndarray  # (n, 2) as (x = column, y = row)


@dataclass
class Nodule:
    id: str
    rois: list[Roi]

    @property
    def small(self) -> bool:
        """A < 3 mm nodule: a single marked point per slice, no outline."""
        return all(len(r.points) < 3 for r in self.rois)


def parse_lidc_xml(path: str | Path) -> tuple[str, list[list[Nodule]]]:
    """Parse a LIDC reader XML; returns ``(series_instance_uid, readers)`` with one list of
    :class:`Nodule` per ``readingSession``. Non-nodules (``nonNodule``) are ignored."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DatasetError(f"{SOURCE}: {path} is not valid XML ({exc})") from None
    if _local(root.tag) != "LidcReadMessage":
        raise DatasetError(f"{SOURCE}: {path} is a {_local(root.tag)!r} file, not a CT LidcReadMessage")
    series_uid = ""
    for header in _children(root, "ResponseHeader"):
        series_uid = _text(header, "SeriesInstanceUid", "") or ""
    readers = []
    for session in _children(root, "readingSession"):
        nodules = []
        for nod in _children(session, "unblindedReadNodule"):
            rois = []
            for roi in _children(nod, "roi"):
                try:
                    z = float(_text(roi, "imageZposition", ""))
                except ValueError:
                    raise DatasetError(f"{SOURCE}: {path}: an roi of {_text(nod, 'noduleID')} has no numeric "
                                       "imageZposition") from None
                pts = [(int(float(_text(e, "xCoord"))), int(float(_text(e, "yCoord"))))
                       for e in _children(roi, "edgeMap")]
                rois.append(Roi(z=z, sop_uid=_text(roi, "imageSOP_UID", "") or "",
                                inclusion=(_text(roi, "inclusion", "TRUE") or "TRUE").upper() == "TRUE",
                                points=np.array(pts, dtype=np.int64).reshape(-1, 2)))
            nodules.append(Nodule(id=_text(nod, "noduleID", "") or "", rois=rois))
        readers.append(nodules)
    if not readers:
        raise DatasetError(f"{SOURCE}: {path} has no readingSession")
    return series_uid, readers


def _slice_z_positions(image: sitk.Image) -> np.ndarray:
    size = image.GetSize()
    return np.array([image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(size[2])])


def rasterise_readers(readers: list[list[Nodule]], image: sitk.Image, include_small: bool = False,
                      z_tolerance: float | None = None) -> np.ndarray:
    """Per-reader nodule masks on the grid of ``image`` (the series as read, not reoriented): an array
    ``(n_readers, z, y, x)`` of uint8. ROIs are matched to slices by ``imageZposition`` (nearest slice,
    within half a slice spacing unless ``z_tolerance``)."""
    nx, ny, nz = image.GetSize()
    zs = _slice_z_positions(image)
    tol = z_tolerance if z_tolerance is not None else 0.5 * max(abs(image.GetSpacing()[2]), 1e-3) + 1e-3
    masks = np.zeros((len(readers), nz, ny, nx), dtype=np.uint8)
    for r, nodules in enumerate(readers):
        for nod in nodules:
            if nod.small and not include_small:
                continue
            nod_mask = np.zeros((nz, ny, nx), dtype=bool)
            # inclusions first, then holes, so the order of rois in the file does not matter
            for roi in sorted(nod.rois, key=lambda r_: not r_.inclusion):
                k = int(np.argmin(np.abs(zs - roi.z)))
                if abs(zs[k] - roi.z) > tol:
                    raise DatasetError(f"{SOURCE}: nodule {nod.id!r} has a contour at z = {roi.z} mm, but no slice "
                                       f"of the series lies within {tol:.2f} mm (slices {zs.min():.1f}..{zs.max():.1f})")
                xs, ys = roi.points[:, 0], roi.points[:, 1]
                if len(roi.points) >= 3:
                    rr, cc = polygon(ys, xs, shape=(ny, nx))
                    pr, pc = polygon_perimeter(ys, xs, shape=(ny, nx), clip=True)
                else:
                    rr, cc = np.clip(ys, 0, ny - 1), np.clip(xs, 0, nx - 1)
                    pr, pc = rr, cc
                if roi.inclusion:
                    nod_mask[k, rr, cc] = True
                    nod_mask[k, pr, pc] = True
                else:
                    # the exclusion's outline belongs to the nodule, like an inclusion's: remove only the
                    # pixels strictly inside it
                    hole = np.zeros((ny, nx), dtype=bool)
                    hole[rr, cc] = True
                    hole[pr, pc] = False
                    nod_mask[k] &= ~hole
            masks[r] |= nod_mask
    return masks


class LidcConsensus:
    """Label source for :class:`~.base.LabelRef`: the >= ``min_readers`` consensus of one XML, rasterised
    on the DICOM series' own grid (then reoriented with the image by :func:`~.base.load_case`)."""

    def __init__(self, xml: str | Path, series_dir: str | Path, min_readers: int = 2, include_small: bool = False):
        self.xml, self.series_dir = Path(xml), Path(series_dir)
        self.min_readers, self.include_small = int(min_readers), include_small

    def __repr__(self) -> str:
        return f"LidcConsensus({str(self.xml)!r}, min_readers={self.min_readers})"

    def reader_count(self, image: sitk.Image | None = None) -> tuple[np.ndarray, sitk.Image]:
        """Number of readers marking each voxel ``(z, y, x)`` on the series' native grid, and that grid."""
        native = image if image is not None else read_image(self.series_dir)[0]
        _, readers = parse_lidc_xml(self.xml)
        masks = rasterise_readers(readers, native, include_small=self.include_small)
        return masks.sum(axis=0).astype(np.uint8), native

    def to_image(self, reference: sitk.Image | None = None) -> sitk.Image:
        count, native = self.reader_count()
        out = sitk.GetImageFromArray((count >= self.min_readers).astype(np.uint8))
        out.CopyInformation(native)
        return out


def read_lidc(root: str | Path, min_readers: int = 2, include_small: bool = False) -> list[Case]:
    """One case per CT series with a ``LidcReadMessage`` XML; target ``nodule`` (consensus mask)."""
    root = require(Path(root), "data set folder", LAYOUT, SOURCE)
    patients = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if root.name.upper().startswith("LIDC-IDRI-"):
        patients = [root]
    cases = []
    for patient in patients:
        found = 0
        for xml in sorted(patient.rglob("*.xml")):
            try:
                head = xml.read_text(errors="ignore")[:2000]
            except OSError:
                continue
            if "LidcReadMessage" not in head:
                continue  # chest radiograph annotations (IdriReadMessage) or other XML
            series = xml.parent
            if not any(series.glob("*.dcm")):
                raise DatasetError(f"{SOURCE}: {xml} has no DICOM files beside it\nExpected layout:\n{LAYOUT}")
            found += 1
            cid = patient.name if found == 1 else f"{patient.name}_{found}"
            cases.append(Case(id=cid, group=patient.name, source=SOURCE, image=series,
                              labels={"nodule": LabelRef(LidcConsensus(xml, series, min_readers, include_small))},
                              meta={"xml": str(xml)}))
    if not cases:
        raise DatasetError(f"{SOURCE}: no CT series with a LidcReadMessage XML under {root}\nExpected layout:\n{LAYOUT}")
    return cases
