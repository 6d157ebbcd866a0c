"""Self-tests of the COVIDLesionSeg module in a real Slicer (ctest: ``slicer_add_python_unittest``).

They complement the pytest suites on slicer-core with what only the application has: the module's
registration, PythonSlicer as the worker's interpreter, the Terminologies module and the parameter node.
"""

import unittest

import slicer


class COVIDLesionSegSelfTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def test_module_registered(self):
        self.assertTrue(hasattr(slicer.modules, "covidlesionseg"), "the module is not loaded")
        module = slicer.modules.covidlesionseg
        self.assertIn("COVID", module.title)

    def test_end_to_end(self):
        """The module's own ScriptedLoadableModuleTest: phantom segmentation (in-process and worker)."""
        from COVIDLesionSeg import COVIDLesionSegTest

        test = COVIDLesionSegTest()
        test.runTest()

    def test_worker_interpreter_is_pythonslicer(self):
        from COVIDLesionSegLib.worker import python_executable

        self.assertIn("PythonSlicer", python_executable())

    def test_terminology_loaded(self):
        import vtk

        from COVIDLesionSeg import loadTerminology
        from COVIDLesionSegLib.segments import SEGMENTS

        terminologies = slicer.modules.terminologies.logic()
        context = loadTerminology(terminologies)
        self.assertIsNotNone(context)
        for segment in SEGMENTS:
            entry = slicer.vtkSlicerTerminologyEntry()
            self.assertTrue(terminologies.DeserializeTerminologyEntry(segment.terminology_entry(), entry))
            self.assertEqual(entry.GetTypeObject().GetCodeValue(), segment.type.value)
            self.assertEqual(entry.GetTypeModifierObject().GetCodeValue(), segment.type_modifier.value)
        names = vtk.vtkStringArray()
        terminologies.GetLoadedTerminologyNames(names)
        self.assertIn(context, [names.GetValue(i) for i in range(names.GetNumberOfValues())])

    def test_parameter_node_round_trip(self):
        from COVIDLesionSeg import COVIDLesionSegLogic, Device

        parameters = COVIDLesionSegLogic().getParameterNode()
        parameters.device = Device.CPU
        parameters.lungsOnly = True
        self.assertEqual(parameters.device, Device.CPU)
        self.assertTrue(parameters.lungsOnly)


if __name__ == "__main__":
    unittest.main()
