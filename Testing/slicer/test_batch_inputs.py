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
