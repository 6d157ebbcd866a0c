"""Write a CT volume as a real DICOM series (CT Image Storage, one file per slice) with pydicom.

Used to give the DICOM outputs a true DICOM source: P001 as the scanner would have stored it. Stored values
are HU + 1024 (unsigned, Rescale Intercept -1024), as most scanners store CT. The UIDs are derived from the
given seed, so a test can name them, and the patient, study and series modules carry the identifiers the
report prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import SimpleITK as sitk


def _uid(seed: str, part: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[seed, part])


def series_uids(seed: str) -> dict[str, str]:
    return {"study": _uid(seed, "study"), "series": _uid(seed, "series"), "frame_of_reference": _uid(seed, "for")}


def write_ct_series(image: sitk.Image, folder: Path, seed: str = "P001", patient_name: str = "COVID-CT-MD^P001",
                    patient_id: str = "P001", extra: Optional[Mapping[str, object]] = None) -> list[Path]:
    """Write ``image`` (HU, any orientation) into ``folder`` as ``CT000.dcm``, ...; returns the files in slice
    order. ``extra`` sets further attributes on every slice (keyword -> value)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    uids = series_uids(seed)
    array = sitk.GetArrayViewFromImage(image)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    files = []
    for k in range(array.shape[0]):
        sop_uid = _uid(seed, f"slice{k}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19700101", "M"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uids["frame_of_reference"], ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20200415", "101500", "1", "ACC0001"
        ds.ReferringPhysicianName, ds.StudyDescription = "", "CT chest"
        ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "CT", 2, "Chest 2.0 B70f"
        ds.Manufacturer, ds.InstitutionName = "SIEMENS", "Test Hospital"
        ds.InstanceNumber, ds.AcquisitionNumber = k + 1, 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([direction[:, 0], direction[:, 1]])]
        ds.PixelSpacing = [float(sy), float(sx)]
        ds.SliceThickness = float(sz)
        ds.KVP = 120
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        ds.PixelData = np.clip(array[k].astype(np.int32) + 1024, 0, 65535).astype("<u2").tobytes()
        path = folder / f"CT{k:03d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return files
