"""The one batch of real CT volumes that the engine's end-to-end tests share (``real_batch``).

One ``covidlesionseg segment ... --dicom`` run (models loaded once) over the three real HU volumes, a copy of
normal001 cut at the lung bases, and P001 written as a DICOM series: the command line, the quality
warnings, the reports, the batch summary and the DICOM SEG/SR are all checked on its outputs.
"""

from __future__ import annotations

import pytest
import SimpleITK as sitk

from COVIDLesionSegLib.cli import main
from Testing.conftest import shared_file

REAL_CASES = ["covidctmd_p001_ct", "covidctmd_normal001_ct", "lidc_0001_ct"]
#: normal001 without its lowest 40 slices (80 mm): its lungs (from slice 12 up) are cut at the bases.
CUT_CASE, CUT_SLICES = "normal001_cut_at_bases", 40
DICOM_CASE = "P001_dicom"


@pytest.fixture(scope="session")
def real_batch(tmp_path_factory):
    """(exit status, output folder, inputs folder) of the shared batch."""
    from .dicom_series import write_ct_series

    paths = [str(shared_file(f"ct/{name}.nii.gz")) for name in REAL_CASES]
    root = tmp_path_factory.mktemp("real")
    normal = sitk.ReadImage(paths[1])
    cut = root / f"{CUT_CASE}.nii.gz"
    sitk.WriteImage(normal[:, :, CUT_SLICES:], str(cut))
    write_ct_series(sitk.ReadImage(paths[0]), root / DICOM_CASE)
    out = root / "out"
    status = main(["segment", *paths, str(cut), str(root / DICOM_CASE), "-o", str(out), "--device", "cpu",
                   "--quiet", "--dicom"])
    return status, out, root
