"""Which module registers which architecture (see registry.py). Add a new network module here.

Building a network imports only its own module (:func:`load_module_of`): importing every one pulls in all of
MONAI (the dual-encoder, nCoVSegNet and grid modules use its blocks), 1.6 s at every start of the engine,
whose default networks are plain nnU-Nets. :func:`load_all` imports them all, for listing.
``test_architecture_modules_are_complete`` checks this table against what the modules register.
"""

import importlib

#: Architecture id -> the module (in this package) that registers it.
ARCHITECTURE_MODULES: dict[str, str] = {
    "nnunet": "nnunet",
    "hybrid_encoder_unet": "dual_encoder",
    "multi_encoder_unet": "dual_encoder",
    "collaborative_unet": "dual_encoder",
    "ncovsegnet": "ncovsegnet",
    "grid_unet": "grid",
    "grid_linknet": "grid",
    "grid_fpn": "grid",
    "grid_pspnet": "grid",
}


def load_module_of(arch_id: str) -> bool:
    """Import the module registering ``arch_id``; False when no module is known for it."""
    module = ARCHITECTURE_MODULES.get(arch_id)
    if module is None:
        return False
    importlib.import_module(f"{__package__}.{module}")
    return True


def load_all() -> None:
    """Import every architecture module once."""
    for module in dict.fromkeys(ARCHITECTURE_MODULES.values()):
        importlib.import_module(f"{__package__}.{module}")
