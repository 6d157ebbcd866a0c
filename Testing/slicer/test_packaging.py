"""Slicer packaging of the module: .ui bindings, CMake lists, extension metadata, icons, help, i18n, imports.

These read the files as text/XML (the desktop application cannot run here) and fail when a widget, a file
or a parameter drifts out of sync with the code.
"""

from __future__ import annotations

import ast
import re
import struct
import subprocess
import sys
import types
import typing
import xml.etree.ElementTree as ET

import pytest

from Testing.conftest import REPO_ROOT

from .conftest import SHIM_DIR

MODULE_DIR = REPO_ROOT / "COVIDLesionSeg"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "COVIDLesionSeg.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
EXTENSION_CMAKE = REPO_ROOT / "CMakeLists.txt"


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def bound_widgets() -> dict[str, ET.Element]:
    """Parameter name -> widget element, from the widgets' ``SlicerParameterName`` dynamic property."""
    bound = {}
    for widget in ui_widgets().values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                name = prop.findtext("string")
                assert name not in bound, f"parameter {name} bound to two widgets"
                bound[name] = widget
    return bound


def widget_property(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


def test_every_parameter_has_a_bound_widget_and_vice_versa(module_file):
    hints = typing.get_type_hints(module_file.COVIDLesionSegParameterNode, include_extras=True)
    bound = bound_widgets()
    assert set(hints) == set(bound), (f"parameters without widget: {set(hints) - set(bound)}; "
                                      f"widgets bound to no parameter: {set(bound) - set(hints)}")
    for name, hint in hints.items():
        widget = bound[name]
        base = typing.get_origin(hint) is typing.Annotated and typing.get_args(hint)[0] or hint
        cls = widget.get("class")
        if isinstance(base, type) and base.__name__.startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox", name
            node_types = [s.text for s in widget_property(widget, "nodeTypes").iter("string")]
            assert base.__name__ in node_types, (name, node_types)
        elif base is bool:
            assert cls == "QCheckBox", name
        elif isinstance(base, type) and issubclass(base, module_file.enum.Enum):
            assert cls == "QComboBox", name      # the stock enum connector needs exactly QComboBox
        elif base is str:
            assert any(isinstance(a, module_file.ModelId) for a in typing.get_args(hint)[1:]), name
            assert cls == "ctkComboBox", name    # our ModelComboBoxConnector
        else:
            pytest.fail(f"no widget rule for parameter {name}: {hint}")


def test_code_uses_only_widgets_that_exist():
    source = (MODULE_DIR / "COVIDLesionSeg.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the widget code uses no widgets?"
    missing = used - set(ui_widgets())
    assert not missing, f"widgets used in COVIDLesionSeg.py but absent from the .ui: {sorted(missing)}"


def test_ui_scene_connections_reach_every_mrml_widget():
    root = ET.parse(UI_FILE).getroot()
    mrml_widgets = {name for name, w in ui_widgets().items() if w.get("class", "").startswith("qMRML")
                    and w.get("class") != "qMRMLWidget"}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert mrml_widgets == connected


def _cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not found"
    return [item.replace("${MODULE_NAME}", "COVIDLesionSeg") for item in match.group(1).split()]


def test_module_cmake_lists_exactly_the_module_files():
    text = MODULE_CMAKE.read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk = sorted(p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
                     and p.relative_to(MODULE_DIR).parts[0] != "Testing" and p.name != "CMakeLists.txt")
    assert sorted(scripts) == [f for f in on_disk if f.endswith(".py")]
    assert sorted(resources) == [f for f in on_disk if not f.endswith(".py")]
    assert len(scripts) == len(set(scripts)) and len(resources) == len(set(resources))
    for needed in ("COVIDLesionSeg.py", "Scripts/infer_worker.py", "Scripts/batch.py",
                   "COVIDLesionSegLib/mrml.py", "COVIDLesionSegLib/worker.py", "COVIDLesionSegLib/slicer_logic.py"):
        assert needed in scripts
    for needed in ("Resources/UI/COVIDLesionSeg.ui", "Resources/Icons/COVIDLesionSeg.png",
                   "Resources/COVIDLesionSeg.term.json"):
        assert needed in resources


def test_module_cmake_builds_and_tests_the_module():
    text = MODULE_CMAKE.read_text()
    call = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1)
    assert "NAME ${MODULE_NAME}" in call and "WITH_GENERIC_TESTS" in call
    assert "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" in call and "RESOURCES ${MODULE_PYTHON_RESOURCES}" in call
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "add_subdirectory(Testing/Python)" in text
    testing = (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text()
    scripts = re.findall(r"slicer_add_python_unittest\(SCRIPT (\S+)\)", testing)
    assert scripts and all((MODULE_DIR / "Testing" / "Python" / s).is_file() for s in scripts)


def test_extension_cmake_metadata():
    text = EXTENSION_CMAKE.read_text()
    assert re.search(r"project\(COVIDLesionSeg\)", text)
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                  "EXTENSION_SCREENSHOTURLS", "EXTENSION_CATEGORY"):
        value = re.search(rf'set\({field} "([^"]*)"\)', text)
        assert value and value.group(1).strip(), field
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text)
    icon = re.search(r'set\(EXTENSION_ICONURL "[^"]*/main/([^"]+)"\)', text).group(1)
    assert (REPO_ROOT / icon).is_file()
    screenshots = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]+)"\)', text).group(1).split()
    for url in screenshots:
        shot = REPO_ROOT / url.split("/main/", 1)[1]
        assert shot.is_file() and shot.suffix == ".png" and shot.stat().st_size < 1_000_000, url
    order = ["find_package(Slicer", "include(${Slicer_USE_FILE})", "add_subdirectory(COVIDLesionSeg)",
             "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.index(item) for item in order]
    assert positions == sorted(positions)


@pytest.mark.parametrize("path", ["COVIDLesionSeg/Resources/Icons/COVIDLesionSeg.png",
                                  "Resources/Icons/COVIDLesionSeg.png"])
def test_icons_are_small_128_pixel_pngs(path):
    data = (REPO_ROOT / path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)
    assert len(data) < 20_000


def test_help_cites_the_papers_and_has_acknowledgement(module_file):
    parent = types.SimpleNamespace()
    module_file.COVIDLesionSeg(parent)
    assert parent.title and parent.categories == ["Segmentation"]
    for title in ("Does Non-COVID19 Lung Lesion Help? Investigating Transferability in COVID-19 CT Image",
                  "Exploiting Shared Knowledge from Non-COVID Lesions for Annotation-Efficient COVID-19 CT",
                  "COVID-19 lung infection segmentation with a novel two-stage cross-domain transfer learning",
                  "Comprehensive Comparison of Deep Learning Models for Lung and COVID-19 Lesion"):
        assert title in " ".join(parent.helpText.split()), title
    assert "2006.13877v1" in parent.helpText and "2006.13877v2" in parent.helpText  # both Wang versions
    assert "COVID-19-CT-Seg" in parent.acknowledgementText and "non-commercial" in parent.acknowledgementText


USER_TEXT_CALLS = {"errorDisplay", "confirmOkCancelDisplay", "warningDisplay", "infoDisplay", "appendLog",
                   "setWindowTitle", "setText", "addButton", "getSaveFileName", "getOpenFileName"}
USER_TEXT_ATTRIBUTES = {"text", "toolTip", "title", "helpText", "acknowledgementText"}


_WORDS = re.compile(r"[A-Za-z]{4,}|[A-Za-z]+ [A-Za-z]+")   # prose, not a file suffix such as ".csv"


def _is_bare_text(node) -> bool:
    """A literal or f-string holding words, not wrapped in _() / translate()."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return bool(_WORDS.search(node.value))
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.Constant) and _WORDS.search(v.value) for v in node.values)
    return False


def test_user_visible_strings_are_translatable():
    tree = ast.parse((MODULE_DIR / "COVIDLesionSeg.py").read_text())
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr in USER_TEXT_ATTRIBUTES
                                                for t in node.targets):
            if _is_bare_text(node.value):
                offenders.append(f"line {node.lineno}: assignment of untranslated text")
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in USER_TEXT_CALLS:
                for arg in node.args:
                    if _is_bare_text(arg):
                        offenders.append(f"line {node.lineno}: {name}() with untranslated text")
    assert not offenders, offenders


def test_module_import_is_light():
    """Importing the module file (what Slicer does at start-up) loads neither torch nor the engine's heavy deps."""
    code = (
        "import sys; sys.path.insert(0, {shim!r}); import slicer; "
        "import importlib.util as u; s = u.spec_from_file_location('COVIDLesionSeg', {module!r}); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); "
        "heavy = [n for n in ('torch', 'monai', 'scipy', 'skimage', 'SimpleITK', 'COVIDLesionSegLib.pipeline') "
        "if n in sys.modules]; print('HEAVY', heavy)"
    ).format(shim=str(SHIM_DIR), module=str(MODULE_DIR / "COVIDLesionSeg.py"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "HEAVY []" in run.stdout, run.stdout


def test_module_loads_the_project_terminology(module_file):
    """What the module does at Slicer start-up: our .term.json becomes a loaded terminology context."""
    import vtk

    from COVIDLesionSegLib import mrml
    from COVIDLesionSegLib.segments import TERMINOLOGY_CONTEXT_NAME

    holder = mrml.create_standalone_scene(with_terminologies=True)
    logic = holder.terminologies_logic
    assert module_file.loadTerminology(logic) == TERMINOLOGY_CONTEXT_NAME
    assert module_file.loadTerminology(logic) == TERMINOLOGY_CONTEXT_NAME   # idempotent
    names = vtk.vtkStringArray()
    logic.GetLoadedTerminologyNames(names)
    loaded = [names.GetValue(i) for i in range(names.GetNumberOfValues())]
    assert loaded.count(TERMINOLOGY_CONTEXT_NAME) == 1
    holder.scene.Clear(1)


# ---------------------------------------------------------------------------------------------------------
# The README's layout section is the tree
# ---------------------------------------------------------------------------------------------------------

#: Column where the layout block's descriptions start (names sit left of it, indented two spaces per level).
_LAYOUT_COLUMN = 33


def _readme_layout() -> dict[str, list[str]]:
    """Folder (relative path, "" for the root) -> the names the README's layout block lists in it."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    listed: dict[str, list[str]] = {"": []}
    stack: list[str] = []
    for line in block.splitlines():
        name = line[:_LAYOUT_COLUMN].strip()
        if not name:
            continue                      # a description's continuation line
        depth = (len(line) - len(line.lstrip())) // 2
        stack = stack[:depth]
        folder = "/".join(stack)
        listed.setdefault(folder, []).append(name)
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
    return listed


def test_readme_layout_matches_the_tree():
    """Every name in the README's layout block exists, and a folder whose contents it lists is listed whole
    (a new module must be placed, with what belongs in it, in the README)."""
    ignored = {"__pycache__", ".venv", ".git", ".pytest_cache", ".ruff_cache", "runs", "demo-output"}
    for folder, names in _readme_layout().items():
        base = REPO_ROOT / folder
        for name in names:
            assert (base / name.rstrip("/")).exists(), f"README layout names {folder}/{name}, which does not exist"
            assert (base / name.rstrip("/")).is_dir() == name.endswith("/"), f"{folder}/{name}: folder or file?"
        if folder == "":
            continue                      # the root also holds what is not the project's (.gitignore, venvs)
        present = {p.name + ("/" if p.is_dir() else "") for p in base.iterdir()
                   if p.name not in ignored and not p.name.endswith((".pyc", ".egg-info"))}
        assert present == set(names), f"README layout of {folder}/: missing {sorted(present - set(names))}, " \
                                      f"stale {sorted(set(names) - present)}"
