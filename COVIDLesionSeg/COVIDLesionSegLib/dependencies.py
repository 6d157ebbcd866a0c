"""Which Python packages a model needs, which are missing, and how to install them.

The decisions (what a model needs, what is missing) are plain Python and tested without Slicer. Installing
is a strategy object (as SlicerMONAIAuto3DSeg's ``DependenciesBase``) that the module's Logic holds
(``COVIDLesionSegLogic.installer``): :class:`SlicerInstaller`, torch through the PyTorch extension and the
rest with Slicer's pip, never replacing Slicer's own torch and SimpleITK. Outside Slicer nothing installs
packages behind the user's back: ``pip install covidlesionseg`` brings them all. The widget only asks the
user before the Logic installs.

Nothing here imports Qt; the Slicer strategy reaches the application through ``slicer`` only when it installs.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Optional, Sequence

from .errors import CovidLesionSegError

#: Python packages the engine needs beyond Slicer's own (import name, pip requirement).
BASE_REQUIREMENTS = (("scipy", "scipy>=1.10"), ("skimage", "scikit-image>=0.21"))
#: Extra packages of the learned models; torch itself comes from the PyTorch extension (PyTorchUtils).
NETWORK_REQUIREMENTS = (("monai", "monai>=1.4"),)
#: Packages of the Report button (matplotlib) and of the DICOM SEG/SR export (highdicom; Slicer has pydicom).
REPORT_REQUIREMENTS = (("matplotlib", "matplotlib>=3.7"),)
DICOM_REQUIREMENTS = (("highdicom", "highdicom>=0.22"),)
#: Packages pip must never replace: Slicer's own builds (and the PyTorch extension's torch).
PROTECTED_PACKAGES = ("torch", "SimpleITK")


class DependencyError(CovidLesionSegError):
    """A package could not be installed; the message says what to do instead."""

    kind = "missing_dependency"


def model_needs_torch(model_id: str) -> bool:
    """Learned models need torch; the built-in Hounsfield-unit models do not. "" means a model import."""
    if not model_id:
        return True
    from . import catalogue

    try:
        return catalogue.get_entry(model_id).source != "built-in"
    except Exception:  # noqa: BLE001 - unknown id: the run will report it; assume the worst here
        return True


def _needs_torch(model_id: str, include_torch: Optional[bool]) -> bool:
    return model_needs_torch(model_id) if include_torch is None else include_torch


def missing_dependencies(model_id: str, include_torch: Optional[bool] = None) -> list[str]:
    """Pip requirement strings (and "torch") that are not importable for running ``model_id``."""
    importlib.invalidate_caches()  # packages installed a moment ago must be found
    missing = [req for name, req in BASE_REQUIREMENTS if importlib.util.find_spec(name) is None]
    if _needs_torch(model_id, include_torch):
        if importlib.util.find_spec("torch") is None:
            missing.append("torch")
        missing += [req for name, req in NETWORK_REQUIREMENTS if importlib.util.find_spec(name) is None]
    return missing


class Installer:
    """How packages get installed; :meth:`install` is the strategy's."""

    def install(self, model_id: str, include_torch: Optional[bool] = None, repair: bool = False) -> None:
        raise NotImplementedError


class SlicerInstaller(Installer):
    """Inside the Slicer application (the caller asked the user first).

    torch comes from the PyTorch extension (``PyTorchUtils``), which picks the build matching the GPU driver;
    the other packages come from pip through ``slicer.packaging.pip_ensure`` (Slicer 5.12+) or
    ``slicer.util.pip_install`` (before), with torch and SimpleITK excluded so that pip never replaces
    Slicer's own builds. ``repair`` reinstalls the packages (without their dependencies).
    """

    def install(self, model_id: str, include_torch: Optional[bool] = None, repair: bool = False) -> None:
        import slicer

        need_torch = _needs_torch(model_id, include_torch)
        if need_torch and (repair or importlib.util.find_spec("torch") is None):
            self._install_torch(repair)
        requirements = [req for name, req in BASE_REQUIREMENTS if repair or importlib.util.find_spec(name) is None]
        if need_torch:
            requirements += [req for name, req in NETWORK_REQUIREMENTS
                             if repair or importlib.util.find_spec(name) is None]
        if not requirements:
            return
        if repair:
            for requirement in requirements:
                slicer.util.pip_install(f"--force-reinstall --no-deps {requirement}")
            return
        self.pip_install(requirements)

    @staticmethod
    def pip_install(requirements: Sequence[str]) -> None:
        """pip-install ``requirements`` the way Slicer wants it, never replacing :data:`PROTECTED_PACKAGES`."""
        import slicer

        requirements = list(requirements)
        try:
            from slicer import packaging as slicer_packaging  # Slicer 5.12+
        except ImportError:
            slicer_packaging = None
        if slicer_packaging is not None and hasattr(slicer_packaging, "pip_ensure"):
            from packaging.requirements import Requirement

            slicer_packaging.pip_ensure([Requirement(r) for r in requirements],
                                        skip_packages=list(PROTECTED_PACKAGES), prompt_install=False,
                                        requester="COVIDLesionSeg")
        else:
            for requirement in requirements:
                # MONAI depends only on numpy and torch: --no-deps keeps pip away from Slicer's torch.
                no_deps = " --no-deps" if requirement.startswith("monai") else ""
                slicer.util.pip_install(f"{requirement}{no_deps}")

    @staticmethod
    def _install_torch(repair: bool) -> None:
        try:
            import PyTorchUtils
        except ImportError:
            raise DependencyError("This model needs PyTorch. Install the 'PyTorch' extension from the Extensions "
                                  "Manager, restart Slicer and try again.") from None
        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        if (repair or not torch_logic.torchInstalled()) and \
                torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=">=2.1") is None:
            raise DependencyError("PyTorch was not installed.",
                                  next_step="install it in the PyTorch Utils module (PyTorch extension), then try again")


def importable(name: str) -> bool:
    """Whether the package ``name`` can be imported here (without importing it)."""
    return importlib.util.find_spec(name) is not None


__all__ = ["BASE_REQUIREMENTS", "DICOM_REQUIREMENTS", "NETWORK_REQUIREMENTS", "PROTECTED_PACKAGES",
           "REPORT_REQUIREMENTS", "DependencyError", "Installer", "SlicerInstaller", "importable",
           "missing_dependencies", "model_needs_torch"]
