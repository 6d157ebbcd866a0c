"""Stand-ins for the application attributes of the ``slicer`` namespace (tests on slicer-core only).

``slicer/__init__.py`` copies the public names of this module into ``slicer``: ``slicer.mrmlScene`` (the
tests assign a real ``vtkMRMLScene``) and ``slicer.modules`` (the tests register real module logics with
:func:`register_module_logic`, so that ``slicer.modules.<name>.logic()`` works as in the application).
There is deliberately no ``slicer.app``: code uses its absence to know it runs outside the application.
"""

import types

mrmlScene = None
modules = types.SimpleNamespace()


class _ModuleStandIn:
    """What ``slicer.modules.<name>`` offers here: ``logic()``."""

    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


def register_module_logic(name, logic):
    setattr(modules, name.lower(), _ModuleStandIn(logic))
