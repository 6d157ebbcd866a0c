"""The served page in a headless Chromium: a broken upload, Segment, the colours in the slice view, a paint
stroke and the table, the downloads, the session folder. The tests run in this order on one page and one server
(each step starts where the last one left off, as a user's session does); together about a minute."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest

from COVIDLesionSegLib.segments import SEGMENTS

SEGMENT_TIMEOUT_MS = 240_000
#: Where the README's screenshot comes from: set COVIDLESIONSEG_WEB_SCREENSHOTS=DIR to keep the page's PNGs.
SCREENSHOT_ENV = "COVIDLESIONSEG_WEB_SCREENSHOTS"


def _keep(page, name: str) -> None:
    import os

    folder = os.environ.get(SCREENSHOT_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))


def _status(page) -> dict:
    return page.eval_on_selector("#cls-status", "e => ({text: e.innerText, finished: e.dataset.finished, "
                                                "edits: e.dataset.edits})")


def _axial_view(page):
    """The largest slice image on the page (the axial view of the layout) and its bounding box."""
    best, box = None, None
    for img in page.query_selector_all("img.image-display-area"):
        b = img.bounding_box()
        if b and (box is None or b["width"] * b["height"] > box["width"] * box["height"]):
            best, box = img, b
    assert best is not None, "no view image on the page"
    return best, box


def _pixels(element) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(element.screenshot(type="png"))).convert("RGB")).astype(int)


def _colour_masks(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Pixels tinted by each segment's colour over the grey CT: the right lung's tan (r > g > b), the left lung's
    blue (b > g > r) and the infection's orange (r far above b). The CT itself is grey (r = g = b)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return {"infection": (r - b > 90) & (g - b > 40),
            "right": (r - b > 15) & (r - b <= 90) & (r >= g) & (g >= b),
            "left": (b - r > 15) & (g - r > 5) & (b >= g)}


def _table(page) -> dict[str, list[str]]:
    rows = page.eval_on_selector_all("#cls-table tr", "rows => rows.map(r => [...r.children].map(c => c.innerText))")
    return {row[0].replace("\n", " "): row[1:] for row in rows[1:]}


def _wait_for(page, condition: str, timeout_ms: int = 60_000) -> None:
    page.wait_for_function(condition, timeout=timeout_ms)


def _wait_for_render(page, seconds: float = 2.0) -> None:
    time.sleep(seconds)     # the views stream their images a moment after the state changes


def test_a_broken_upload_shows_the_engines_message_and_is_kept(page, server, phantom_data, tmp_path):
    from COVIDLesionSegLib.checks import load_volume
    from COVIDLesionSegLib.worker import classify_error

    source = tmp_path / "broken.nii.gz"
    source.write_bytes((phantom_data / "phantom.nii.gz").read_bytes()[:4000])     # a NIfTI cut off after 4 kB
    page.set_input_files("#cls-upload", str(source))
    _wait_for(page, "document.querySelector('#cls-error') !== null")
    shown = page.inner_text("#cls-error")

    kept = sorted(server.session_folder.glob("uploads/*/broken.nii.gz"))
    assert len(kept) == 1 and kept[0].read_bytes() == source.read_bytes(), "the upload was not kept as it came"
    with pytest.raises(Exception) as refused:
        load_volume(kept[0])
    expected = classify_error(refused.value)[1]
    assert " ".join(expected.split()) in " ".join(shown.split()), (shown, expected)
    assert "truncated" in shown or "corrupt" in shown or "damaged" in shown


def test_a_case_of_the_data_folder_opens_and_cancel_stops_its_run(page, server):
    page.click("#cls-data", force=True)
    page.click(".v-overlay .v-list-item:has-text('fine_phantom.nii.gz')")
    page.click("#cls-open-data")
    _wait_for(page, "document.querySelector('#cls-status').innerText.includes('fine_phantom loaded')")
    assert page.query_selector("#cls-error") is None
    page.click("#cls-segment")
    _wait_for(page, "document.querySelector('#cls-segment').innerText.toUpperCase().includes('CANCEL')")
    _wait_for(page, "/Segmenting|Checking|Preparing/.test(document.querySelector('#cls-status').innerText)")
    started = time.monotonic()
    page.click("#cls-segment")
    _wait_for(page, "document.querySelector('#cls-status').innerText.includes('Cancelled')", 15_000)
    assert time.monotonic() - started < 10, "Cancel was not served while the segmentation ran"
    assert page.query_selector("#cls-table") is None, "a cancelled run left a result"
    assert page.inner_text("#cls-segment").upper() == "SEGMENT"


def test_segment_shows_the_segments_in_their_colours_where_the_lungs_are(page, server, phantom_data):
    page.set_input_files("#cls-upload", str(phantom_data / "phantom.nii.gz"))
    _wait_for(page, "document.querySelector('#cls-status').innerText.includes('loaded')")
    assert page.query_selector("#cls-error") is None
    _wait_for_render(page)
    view, _ = _axial_view(page)
    before = _colour_masks(_pixels(view))
    assert all(mask.sum() < 20 for mask in before.values()), "coloured pixels before any segmentation"

    page.click("#cls-segment")
    _wait_for(page, "document.querySelector('#cls-segment').innerText.includes('CANCEL') || "
                    "document.querySelector('#cls-status').dataset.finished === '1'")
    _wait_for(page, "document.querySelector('#cls-status').dataset.finished === '1' || "
                    "document.querySelector('#cls-error') !== null", SEGMENT_TIMEOUT_MS)
    assert page.query_selector("#cls-error") is None, page.inner_text("#cls-error")
    assert "Done" in _status(page)["text"]
    _wait_for_render(page, 3.0)
    _keep(page, "segmented.png")

    view, _ = _axial_view(page)
    rgb = _pixels(view)
    masks = _colour_masks(rgb)
    width = rgb.shape[1]
    for side in ("right", "left"):
        assert masks[side].sum() > 500, f"{side} lung colour missing from the axial view ({masks[side].sum()} px)"
    # Radiological display: the patient's right lung on the left of the screen, the left lung on the right.
    assert np.nonzero(masks["right"])[1].mean() < width / 2 < np.nonzero(masks["left"])[1].mean()
    assert masks["infection"].sum() > 20, "infection colour missing from the axial view"
    # Each lung's colour fills a lung, not the body: a compact region well inside the view.
    table = _table(page)
    assert set(table) >= {"Right lung", "Left lung", "Both lungs"}
    assert float(table["Both lungs"][0]) > 1000          # lung volume in mL
    assert float(table["Both lungs"][2]) > 0             # infected %


def test_a_paint_stroke_changes_the_table(page, server):
    before = _table(page)
    page.click("#tool-SegmentEditorUI")
    _wait_for(page, "document.querySelector('input[value=\"Right lung\"]') !== null")
    page.click(".v-card-item button:has(i.mdi-brush)")            # the editor's Paint effect
    _wait_for_render(page, 1.0)
    view, box = _axial_view(page)
    left = _colour_masks(_pixels(view))["left"]
    ys, xs = np.nonzero(left)
    cy, cx = box["y"] + ys.mean(), box["x"] + xs.mean()
    # Paint the active segment (Right lung) across the middle of the left lung: one stroke.
    page.mouse.move(cx - 25, cy)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(cx - 25 + 5 * step, cy + step)
        time.sleep(0.05)
    page.mouse.up()
    _wait_for(page, "document.querySelector('#cls-status').dataset.edits !== '0'", 60_000)
    _wait_for_render(page, 1.5)
    after = _table(page)
    right_before, right_after = float(before["Right lung"][0]), float(after["Right lung"][0])
    left_before, left_after = float(before["Left lung"][0]), float(after["Left lung"][0])
    assert right_after > right_before, (before["Right lung"], after["Right lung"])
    assert left_after < left_before, "painting over the left lung should take those voxels from it"
    _keep(page, "painted.png")
    page.click("#tool-cls")


def test_downloads_load_in_slicer_core_with_the_edited_segments(page, server, tmp_path):
    from vtkmodules.util.numpy_support import vtk_to_numpy

    import slicer
    from COVIDLesionSegLib import mrml

    table = _table(page)
    page.click("#cls-prepare")
    _wait_for(page, "document.querySelectorAll('#cls-downloads a').length >= 4", 120_000)
    kinds = page.eval_on_selector_all("#cls-downloads a", "links => links.map(a => a.dataset.kind)")
    assert {"segmentation", "labelmap", "csv", "json", "pdf", "html"} <= set(kinds)

    files = {}
    for kind in ("segmentation", "csv"):
        with page.expect_download() as info:
            page.click(f"#cls-downloads a[data-kind='{kind}']")
        files[kind] = tmp_path / info.value.suggested_filename
        info.value.save_as(files[kind])
    assert files["segmentation"].name == "phantom.seg.nrrd"

    holder = mrml.create_standalone_scene()
    node = holder.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(files["segmentation"]))
    assert storage.ReadData(node), "slicer-core could not read the downloaded .seg.nrrd"
    segmentation = node.GetSegmentation()
    segments = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegment(i)
                for i in range(segmentation.GetNumberOfSegments())}
    assert set(segments) == {s.name for s in SEGMENTS}
    for definition in SEGMENTS:
        assert np.allclose(segments[definition.name].GetColor(), definition.color, atol=1e-3)

    # The file holds the edited segments: its right-lung volume is the table's (after the paint stroke).
    labelmap = slicer.vtkOrientedImageData()
    segmentation_id = segmentation.GetSegmentIdBySegmentName("Right lung")
    node.GetBinaryLabelmapRepresentation(segmentation_id, labelmap)
    voxels = int(vtk_to_numpy(labelmap.GetPointData().GetScalars()).astype(bool).sum())
    spacing = labelmap.GetSpacing()
    ml = voxels * spacing[0] * spacing[1] * spacing[2] / 1000.0
    assert abs(ml - float(table["Right lung"][0])) < 0.2, (ml, table["Right lung"])

    rows = {line.split(",")[0]: line.split(",")[1:] for line in files["csv"].read_text().splitlines()[1:]}
    assert abs(float(rows["Right lung"][0]) - float(table["Right lung"][0])) < 0.06


def test_stopping_the_server_removes_the_session_folder(server):
    assert server.session_folder.is_dir()
    server.stop()
    assert not server.session_folder.exists(), "the session's uploads and outputs outlived the server"
