"""The PDF and HTML reports (``reports.py``): they exist, are not blank, show the segments in their terminology
colours, and say what a reader must see (identifiers, numbers, warnings, models, the not-for-diagnosis line).

One phantom case is segmented once for the module (a few seconds); the PDF is rendered to pixels with pypdfium2
(or poppler's pdftoppm where pypdfium2 is missing), the HTML's embedded PNGs are decoded.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from COVIDLesionSegLib import outputs, reports
from COVIDLesionSegLib.cli import main
from COVIDLesionSegLib.phantom import make_chest_phantom
from COVIDLesionSegLib.pipeline import Pipeline
from COVIDLesionSegLib.segments import SEGMENTS
from COVIDLesionSegLib.volume import CTVolume

from .faults import write_phantom


def render_pdf(path, dpi: int = 90) -> list[np.ndarray]:
    """Every page of a PDF as an RGB array."""
    try:
        import pypdfium2 as pdfium
    except ImportError:
        pdfium = None
    if pdfium is not None:
        document = pdfium.PdfDocument(str(path))
        pages = [np.asarray(page.render(scale=dpi / 72).to_pil().convert("RGB")) for page in document]
        document.close()
        return pages
    if shutil.which("pdftoppm") is None:
        pytest.skip("neither pypdfium2 (pip) nor pdftoppm (apt: poppler-utils) is installed to render the PDF")
    out = path.parent / "pages"
    subprocess.run(["pdftoppm", "-r", str(dpi), "-png", str(path), str(out)], check=True)
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(path.parent.glob("pages*.png"))]


def colour_pixels(rgb: np.ndarray, colour, tolerance: float = 14.0) -> int:
    """Pixels within ``tolerance`` (RGB distance) of ``colour``."""
    distance = np.linalg.norm(rgb.astype(np.float32) - np.asarray(colour, np.float32), axis=-1)
    return int(np.count_nonzero(distance <= tolerance))


def html_images(page: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
            for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


@pytest.fixture(scope="module")
def phantom_report(tmp_path_factory):
    """The phantom segmented in memory and its two report files."""
    image, _ = make_chest_phantom()
    result = Pipeline().run(CTVolume.from_image(image, name="phantom", source="phantom.nii.gz"))
    report = result.report()
    folder = tmp_path_factory.mktemp("report")
    pdf, page = reports.write_case_report(folder / "phantom_report.pdf", folder / "phantom_report.html", report,
                                          result.volume, result.lungs, result.infection)
    return {"report": report, "pdf": pdf, "html": page, "result": result}


def test_pdf_has_a_summary_page_and_a_page_of_slices_in_the_segment_colours(phantom_report):
    pages = render_pdf(phantom_report["pdf"])
    assert len(pages) == 2
    for page in pages:
        assert page.std() > 20, "a blank page"
        assert np.mean(page.min(axis=-1) > 245) < 0.97, "almost nothing on the page"
    summary, slices = pages
    # Page 1: the bar chart in the lungs' colours; page 2: the outlines and the infection.
    assert colour_pixels(summary, SEGMENTS.right_lung.color_rgb255) > 100
    assert colour_pixels(summary, SEGMENTS.left_lung.color_rgb255) > 100
    for seg in SEGMENTS:
        assert colour_pixels(slices, seg.color_rgb255) > 200, f"{seg.name} is not shown on the slices page"
    # The slices are CT, not flat colour: many grey levels.
    assert len(np.unique(slices[..., 0][slices[..., 0] == slices[..., 2]])) > 100


def test_pdf_text_says_what_a_reader_must_see(phantom_report):
    pdfium = pytest.importorskip("pypdfium2", reason="pypdfium2 reads the PDF's text")
    document = pdfium.PdfDocument(str(phantom_report["pdf"]))
    text = " ".join(page.get_textpage().get_text_range() for page in document)
    document.close()
    q = phantom_report["report"]["quantification"]
    assert "NOT FOR DIAGNOSTIC USE" in text
    assert "not recorded in the input" in text          # a file without a DICOM header says so
    assert f"{q['both_lungs']['volume_ml']:,.0f} mL" in text
    assert f"{q['severity']['zone_score']} / 24" in text
    assert "Opacity (PO)" in text and "High opacity (PHO)" in text
    assert "Chaganti" in text and "Wu J" in text
    infection = phantom_report["report"]["models"]["infection"]       # the default model, whichever it is
    assert f"{infection['id']} version {infection['version']}" in text and "Apache-2.0" in text
    assert "Key slices" in text


def test_html_report_embeds_the_same_pictures_and_the_numbers(phantom_report):
    page = phantom_report["html"].read_text(encoding="utf-8")
    assert 'content="COVIDLesionSeg"' in page and "NOT FOR DIAGNOSTIC USE" in page
    images = html_images(page)
    assert len(images) == 5                               # the chart and four views
    views = images[1:]
    for seg in SEGMENTS:
        # The views are the composed pixel arrays themselves: the outlines carry the exact colour.
        assert sum(colour_pixels(v, seg.color_rgb255, tolerance=0.5) for v in views) > 50, seg.name
    assert all(v.std() > 20 for v in views)
    q = phantom_report["report"]["quantification"]
    assert f"{q['both_lungs']['volume_ml']:,.0f} mL" in page
    assert reports._percent(q["severity"]["percentage_of_high_opacity"]["both_lungs"]) in page
    assert "Infection model" in page and "Definitions" in page


def test_views_follow_the_radiological_convention(phantom_report):
    """The patient's right lung is drawn on the image's left, and superior is at the top of the coronal view."""
    result = phantom_report["result"]
    views = reports.key_views(result.volume, result.lungs, result.infection)
    assert [v["markers"] for v in views] == [("R", "L", "A")] * 3 + [("R", "L", "S")]
    for view in views:
        right = colour_pixels(view["rgb"], SEGMENTS.right_lung.color_rgb255, tolerance=0.5)
        columns = np.nonzero(np.linalg.norm(view["rgb"].astype(float) - SEGMENTS.right_lung.color_rgb255, axis=-1)
                             < 0.5)[1]
        left_columns = np.nonzero(np.linalg.norm(view["rgb"].astype(float) - SEGMENTS.left_lung.color_rgb255,
                                                 axis=-1) < 0.5)[1]
        assert right > 0 and columns.mean() < left_columns.mean()
    # Axial views from the upper, middle and lower thirds: their z positions decrease.
    z = [float(re.search(r"z = (-?[\d.]+) mm", v["title"]).group(1)) for v in views[:3]]
    assert z[0] > z[1] > z[2]


def test_percentages_read_as_zero_only_when_nothing_was_found():
    assert reports._percent(0.0) == "0 %"
    assert reports._percent(0.004) == "< 0.01 %"
    assert reports._percent(12.345) == "12.35 %"
    assert reports._percent(None) == "n/a"


def test_a_batch_writes_every_case_report_and_a_summary(tmp_path):
    for i in range(2):
        write_phantom(tmp_path / "in" / f"case{i}.nii.gz", seed=i)
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not a NIfTI file" * 64)
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "in"), "-o", str(out), "--quiet"]) == 1   # one case fails
    for case in ("case0", "case1"):
        assert (out / f"{case}_report.pdf").read_bytes().startswith(b"%PDF")
        assert (out / f"{case}_report.html").is_file()
        listed = json.loads((out / f"{case}.json").read_text())["outputs"]
        assert listed["pdf_report"] == f"{case}_report.pdf" and listed["html_report"] == f"{case}_report.html"
    summary = (out / "report.html").read_text(encoding="utf-8")
    rows = outputs.read_results_csv(out / "results.csv")
    assert '<a href="case0_report.html">case0</a>' in summary and '<a href="case1_report.html">case1</a>' in summary
    assert "broken" in summary and "failed" in summary
    for row in rows:
        if row["status"] == "ok":
            assert f"<td>{row['both_po_pct']}</td>" in summary and f"<td>{row['zone_score']}</td>" in summary
    (plot,) = html_images(summary)
    assert plot.std() > 20 and colour_pixels(plot, SEGMENTS.infection.color_rgb255) > 20
    # --no-report writes neither the case reports nor the summary.
    bare = tmp_path / "bare"
    assert main(["segment", str(tmp_path / "in" / "case0.nii.gz"), "-o", str(bare), "--quiet", "--no-report"]) == 0
    assert sorted(p.name for p in bare.iterdir() if not p.name.startswith(".")) == [
        "case0.json", "case0.seg.nrrd", "case0_labels.nii.gz", "results.csv"]


def test_the_batch_summary_draws_the_distribution_of_two_cases_or_more(tmp_path):
    # One case has no distribution: its row is the whole summary, and its own report has the figures.
    row = {"case": "a", "status": "ok", "right_lung_ml": "2100", "left_lung_ml": "1900", "both_lungs_ml": "4000",
           "both_po_pct": "3.25", "both_pho_pct": "0.5", "zone_score": "4", "warnings": ""}
    one = reports.render_batch_html([row], tmp_path).decode("utf-8")
    assert "<td>3.25</td>" in one and html_images(one) == [] and "Distribution over the cases" not in one
    failed = {"case": "b", "status": "failed", "error": "not a CT"}
    assert html_images(reports.render_batch_html([row, failed], tmp_path).decode("utf-8")) == []
    two = reports.render_batch_html([row, {**row, "case": "c", "both_po_pct": "17.5", "zone_score": "9"}], tmp_path)
    (plot,) = html_images(two.decode("utf-8"))
    assert colour_pixels(plot, SEGMENTS.infection.color_rgb255) > 20


def test_a_users_own_report_html_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("<html>my own notes</html>")
    outputs.update_results_row(out / "results.csv", {"case": "x", "status": "failed", "error": "e"})
    assert reports.write_batch_report(out) is None
    assert (out / "report.html").read_text() == "<html>my own notes</html>"


def test_a_lungs_only_report_shows_no_infection_chart(tmp_path):
    """A ``--lungs-only`` case measured no infection: its report says so instead of charting zeros."""
    from COVIDLesionSegLib.pipeline import SegmentOptions

    image, _ = make_chest_phantom()
    result = Pipeline(SegmentOptions(lungs_only=True)).run(CTVolume.from_image(image, name="phantom", source="p.nii"))
    report = result.report()
    assert not reports.infection_measured(report)
    pdf, page = reports.write_case_report(tmp_path / "r.pdf", tmp_path / "r.html", report, result.volume,
                                          result.lungs, None)
    html_text = page.read_text(encoding="utf-8")
    assert len(html_images(html_text)) == 4 and reports.NO_CHART in html_text     # the four views, no chart
    pdfium = pytest.importorskip("pypdfium2", reason="pypdfium2 reads the PDF's text")
    document = pdfium.PdfDocument(str(pdf))
    text = " ".join(p.get_textpage().get_text_range() for p in document)
    document.close()
    assert "no infection chart" in text and "not measured" in text
    summary = render_pdf(pdf)[0]
    # No bars in the lungs' colours on the summary page (the chart is gone; the tables are black on white).
    assert colour_pixels(summary, SEGMENTS.right_lung.color_rgb255) < 20
