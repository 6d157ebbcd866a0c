"""The interface every segmentation model implements, and the built-in non-learned models.

Two tasks:

- **lungs**: ``LungModel.segment(volume, progress) -> uint8 (z, y, x)`` with 0 background, 1 right lung,
  2 left lung, on the canonical grid of the :class:`~COVIDLesionSegLib.volume.CTVolume`.
- **infection**: ``InfectionModel.predict(volume, lungs, progress) -> float32 (z, y, x)`` probabilities in
  [0, 1] on the same grid, or a bool mask from a model that decides without probabilities (the built-in
  one: a quarter of the memory, 1 GB less on a 512 x 512 x 1000 scan). The pipeline thresholds at
  :attr:`ModelInfo.threshold` (``mask >= threshold`` is the mask itself) and keeps only voxels inside the
  lungs.

Learned networks (2D slice-batched or 3D sliding-window, CPU or CUDA) implement the same interface in
``network_predictor.py``; the engine never needs to know which kind it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np

from .progress import ProgressCallback
from .volume import CTVolume


@dataclass(frozen=True)
class ModelInfo:
    """What the user and the reports see of a model."""

    model_id: str
    version: str
    task: str                          # "lungs" or "infection"
    description: str
    threshold: float = 0.5             # probability threshold (infection models)
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class LungModel(Protocol):
    info: ModelInfo

    def segment(self, volume: CTVolume, progress: Optional[ProgressCallback] = None) -> np.ndarray:
        ...


@runtime_checkable
class InfectionModel(Protocol):
    info: ModelInfo

    def predict(self, volume: CTVolume, lungs: np.ndarray,
                progress: Optional[ProgressCallback] = None) -> np.ndarray:
        ...


class HULungModel:
    """Lung masking from Hounsfield units, no trained weights (see ``lungs.py``).

    ``fast``: the fast mode, on a grid of ``lungs.FAST_TARGET_SPACING_MM`` instead of 2 mm.
    """

    info = ModelInfo(
        model_id="hu-lungs",
        version="1",
        task="lungs",
        description="Right/left lung masking from Hounsfield units (no trained weights)",
    )

    def __init__(self, fast: bool = False):
        self.fast = bool(fast)

    def segment(self, volume: CTVolume, progress: Optional[ProgressCallback] = None) -> np.ndarray:
        from .lungs import FAST_PARAMS, LungMaskParams, segment_lungs

        return segment_lungs(volume.hu, volume.spacing_zyx, progress=progress,
                             params=FAST_PARAMS if self.fast else LungMaskParams())


class HUInfectionModel:
    """Ground-glass and consolidation Hounsfield bands inside the lungs, vessels removed (``infection_hu.py``).

    ``fast``: the fast mode, decisions on a 2 mm grid instead of 1.25 mm.
    """

    info = ModelInfo(
        model_id="hu-threshold",
        version="1",
        task="infection",
        description="Hounsfield-band baseline: ground-glass and consolidation inside the lungs, vessels removed",
    )

    def __init__(self, fast: bool = False):
        self.fast = bool(fast)

    def predict(self, volume: CTVolume, lungs: np.ndarray,
                progress: Optional[ProgressCallback] = None) -> np.ndarray:
        from .infection_hu import segment_infection_hu

        return segment_infection_hu(volume.hu, lungs, volume.spacing_zyx, progress=progress, fast=self.fast)
