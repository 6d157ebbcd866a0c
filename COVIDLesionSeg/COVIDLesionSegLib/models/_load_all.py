"""Imports every architecture module so that each registers itself (see registry.py).

Add a new network module to this list.
"""

import importlib

_MODULES: list[str] = [
    "nnunet",
    "dual_encoder",
    "ncovsegnet",
    "grid",
]

for _name in _MODULES:
    importlib.import_module(f"{__package__}.{_name}")
