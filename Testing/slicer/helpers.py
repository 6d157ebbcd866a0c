"""Helpers shared by the Slicer-side test files: segment and direction helpers for MRML nodes, and
``Scripts/batch.py`` imported as a module. Fixtures are in ``conftest.py`` beside this file."""

from __future__ import annotations

import math

import numpy as np
import vtk

from .conftest import BATCH_SCRIPT


def oblique_direction(flip_x: bool = True) -> tuple[float, ...]:
    """A direction matrix rotated by 17 deg about z and 9 deg about x, optionally with the x axis flipped."""
    a, b = math.radians(17), math.radians(9)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    d = rz @ rx @ np.diag([-1.0 if flip_x else 1.0, 1.0, 1.0])
    return tuple(float(v) for v in d.ravel())


def segment_names(segmentation_node) -> list[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


def tag(segment, name):
    value = vtk.reference("")
    return str(value.get()) if segment.GetTag(name, value) else None


def _batch_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("covidlesionseg_batch", BATCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
