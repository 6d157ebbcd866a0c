"""Stand-in for Slicer's ``slicer.ScriptedLoadableModule`` (tests on slicer-core only; see README.md).

Only what the module file uses outside the GUI: the module base stores its description on ``parent``, the
logic base has no parameter node (that needs the application), the widget base cannot be built without Qt,
and the test base is a ``unittest.TestCase`` whose ``delayDisplay`` prints instead of showing a message.
"""

import unittest


class ScriptedLoadableModule:
    """Real one: registers the module with the application; here it only keeps ``parent``."""

    def __init__(self, parent):
        self.parent = parent
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""


class ScriptedLoadableModuleLogic:
    """Real one: also provides ``getParameterNode()`` (a scene singleton), which needs the application."""

    def __init__(self, parent=None):
        self.parent = parent

    def getParameterNode(self):
        raise RuntimeError("parameter nodes need the Slicer application (slicer.parameterNodeWrapper)")


class ScriptedLoadableModuleWidget:
    """Real one: a Qt panel. Cannot exist without Qt."""

    def __init__(self, parent=None):
        self.parent = parent

    def setup(self):
        raise RuntimeError("module widgets need the Slicer application (Qt)")


class ScriptedLoadableModuleTest(unittest.TestCase):
    """Real one: ``delayDisplay`` shows a transient message in the application; here it prints."""

    def delayDisplay(self, message, requestedDelay=None, msec=None):
        print(message)

    def runTest(self):  # overridden by the module's test class
        pass
