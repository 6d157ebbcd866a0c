"""Reports a radiologist can read: ``<case>_report.pdf`` / ``.html`` per case and ``report.html`` per batch.

Made with matplotlib's object-oriented API (``Figure`` + Agg canvas, ``PdfPages``), never ``pyplot``: no
global state and no GUI backend, so the same code runs headless, in a worker and inside Slicer.

A case report holds, in this order: the identifiers from the input's header (DICOM: patient name and ID,
birth date, sex, study date, accession number, study and series, institution, scanner; a file without such a
header says so), a "not for diagnostic use" line, the volumes and severity measures of each lung and both
(percentage of opacity and of high opacity, Chaganti et al. 2020; the six-zone score, Wu et al. 2020; see
``quantify.py``), the zones' infected percentages and points, the quality warnings (``quality.py``), key
slices with the segments overlaid, a bar chart of the infected percentage per lung and zone, the models with
their versions and licences, and the definitions with their sources.

Pictures: three axial slices, one per vertical third of the lungs (the slice with the most infection in that
third, or its middle slice when it has none), and a coronal slice through the lungs (the row with the most
infection), in the lung window (level -600 HU, width 1500 HU), radiological convention (patient's right on
the image's left, anterior or superior at the top), resampled to square pixels, cropped to the lungs with a
2 cm margin. Each lung is outlined in its terminology colour (``segments.py``), the infection filled in its
colour at 45 % opacity and outlined. The PDF and the HTML embed the very same pixel arrays (PNG in the HTML).

The batch summary ``report.html`` is made from ``results.csv`` (the table that matches the folder's files):
one row per case with its numbers, warnings and a link to its report, and the distribution of the
percentage of opacity and of the zone score over the cases.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from . import LABEL_LEFT_LUNG, LABEL_RIGHT_LUNG, __version__
from .preprocessing import axis_counts
from .segments import SEGMENTS

LUNG_WINDOW = (-600.0, 1500.0)   # level, width (HU)
INFECTION_ALPHA = 0.45
MARGIN_MM = 20.0
NOT_FOR_DIAGNOSIS = ("NOT FOR DIAGNOSTIC USE. Research software: the segmentation and every number here must be "
                     "checked by a qualified reader before any clinical decision.")
BATCH_REPORT = "report.html"
#: Segmented cases from which the batch summary draws their distribution (:func:`render_batch_html`).
MIN_CASES_FOR_DISTRIBUTION = 2
#: Marks an HTML file as this tool's, so that a user's own report.html is never replaced.
GENERATOR = "COVIDLesionSeg"
A4 = (8.27, 11.69)
_SIDES = (("right_lung", "Right lung"), ("left_lung", "Left lung"), ("both_lungs", "Both lungs"))
_THIRDS = ("upper", "middle", "lower")


# -------------------------------------------------------------------------------------------------------------
# Content shared by the PDF and the HTML
# -------------------------------------------------------------------------------------------------------------

_PRELOAD: Optional[threading.Thread] = None
#: In place of the infection chart of a lungs-only case (nothing was measured to chart).
NO_CHART = "The infection was not segmented (lungs only): no infection chart."
#: zlib level of the HTML report's pictures (:func:`_png`).
PNG_LEVEL = 3


def import_in_background() -> None:
    """Start importing what drawing a report needs (matplotlib, its PDF and Agg backends, Pillow: 0.35 s, 40 MB)
    in a daemon thread, once per process, so that it overlaps other work (``Pipeline.run`` starts it when the
    models are done: docs/default_models.md, section 8.7). The report imports them itself as before; a failed
    import here is ignored (the report's own import then says what is missing)."""
    global _PRELOAD
    if _PRELOAD is not None:
        return

    def load() -> None:
        try:
            import matplotlib.backends.backend_agg  # noqa: F401
            import matplotlib.backends.backend_pdf  # noqa: F401
            import matplotlib.figure  # noqa: F401
            import matplotlib.patches  # noqa: F401
            import PIL.Image  # noqa: F401
        except Exception:  # noqa: BLE001,S110 - only a head start: the report imports them again and reports failure
            pass

    _PRELOAD = threading.Thread(target=load, name="covidlesionseg-report-imports", daemon=True)
    _PRELOAD.start()


def _dash(value: Any) -> str:
    return "\u2014" if value in (None, "") else str(value)


def _date(text: Optional[str]) -> str:
    """DICOM DA (YYYYMMDD) as YYYY-MM-DD; anything else as it is."""
    if text and len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return _dash(text)


def _person(text: Optional[str]) -> str:
    """DICOM PN (family^given^middle^prefix^suffix) as "Family, Given Middle"."""
    if not text:
        return _dash(text)
    parts = [p.strip() for p in str(text).split("=")[0].split("^")]
    family, given = parts[0], " ".join(p for p in parts[1:3] if p)
    return f"{family}, {given}" if family and given else (family or given)


def _number(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{float(value):,.{digits}f}{(' ' + unit) if unit else ''}"


def _percent(value: Any) -> str:
    """A percentage for reading: "0 %" only when nothing was found, "< 0.01 %" for a trace (which still scores
    a zone point), else two decimals."""
    if value is None:
        return "n/a"
    value = float(value)
    if value == 0:
        return "0 %"
    return "< 0.01 %" if value < 0.005 else f"{value:.2f} %"


def identifiers(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows identifying the patient, the study and the input."""
    source = report.get("input", {})
    header = source.get("dicom", {}).get("header", {})
    rows: list[tuple[str, str]] = []
    if header:
        study_time = header.get("StudyTime", "")
        when = _date(header.get("StudyDate")) + (f" {study_time[:2]}:{study_time[2:4]}" if len(study_time) >= 4 else "")
        series = " ".join(x for x in (header.get("SeriesNumber", ""), header.get("SeriesDescription", "")) if x)
        rows += [("Patient name", _person(header.get("PatientName"))), ("Patient ID", _dash(header.get("PatientID"))),
                 ("Birth date", _date(header.get("PatientBirthDate"))), ("Sex", _dash(header.get("PatientSex"))),
                 ("Study date", when), ("Accession number", _dash(header.get("AccessionNumber"))),
                 ("Study", _dash(header.get("StudyDescription"))), ("Series", _dash(series)),
                 ("Institution", _dash(header.get("InstitutionName"))),
                 ("Scanner", _dash(" ".join(x for x in (header.get("Manufacturer", ""),
                                                        header.get("ConvolutionKernel", "")) if x)))]
    else:
        rows.append(("Patient", "not recorded in the input (an image file without a DICOM header): identify the "
                                "scan by its file name"))
    size, spacing = source.get("size", []), source.get("spacing_mm", [])
    rows += [("Case", _dash(report.get("case"))), ("Input", _dash(source.get("source"))),
             ("Image", f"{' x '.join(str(s) for s in size)} voxels, "
                       f"{' x '.join(f'{float(s):.3g}' for s in spacing)} mm" if size and spacing else "\u2014")]
    return rows


def infection_measured(report: Mapping[str, Any]) -> bool:
    """False for a ``--lungs-only`` case: its infection columns and chart would be zeros that were never measured."""
    return report["quantification"].get("infection_segmented", True) is not False


def result_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The results table: (header, rows) per lung and both lungs."""
    q = report["quantification"]
    measured = infection_measured(report)
    header = ["", "Lung volume", "Infection", "Opacity (PO)", "High opacity (PHO)", "Zone score"]
    rows = []
    for key, label in _SIDES:
        e = q[key]
        maximum = 24 if key == "both_lungs" else 12
        rows.append([label, _number(e["volume_ml"], "mL", 0),
                     _number(e["infection_ml"], "mL", 1) if measured else "not measured",
                     _percent(e.get("infected_percent")) if measured else "\u2014",
                     _percent(e.get("high_opacity_percent")) if measured else "\u2014",
                     f"{e['zone_score']} / {maximum}" if measured and e.get("zone_score") is not None else "\u2014"])
    return header, rows


def zone_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The zone table: infected % and points of each third of each lung (the score's six zones)."""
    q = report["quantification"]
    measured = infection_measured(report)
    header = ["Zone", "Right: infected", "Right: points", "Left: infected", "Left: points"]
    rows = []
    for zone in _THIRDS:
        row = [zone.capitalize() + " third"]
        for key in ("right_lung", "left_lung"):
            z = q[key]["zones"][zone]
            row += [_percent(z.get("infected_percent")) if measured else "\u2014",
                    _dash(z.get("zone_score")) if measured else "\u2014"]
        rows.append(row)
    return header, rows


def model_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for task, model in report.get("models", {}).items():
        text = f"{model.get('id', '?')} version {model.get('version', '?')} on {model.get('device', '?')}"
        rows.append((f"{task.capitalize()} model", text + (f"; licence: {model['licence']}" if model.get("licence")
                                                           else "")))
    rows.append(("Software", f"COVIDLesionSeg {report.get('software', {}).get('covidlesionseg', __version__)} "
                             "(Apache-2.0)"))
    return rows


def definitions() -> list[str]:
    from .quantify import HIGH_OPACITY_HU

    return [
        "Percentage of opacity (PO): infection volume / lung volume. Percentage of high opacity (PHO): volume of "
        f"the infection above {HIGH_OPACITY_HU:g} HU / lung volume. Chaganti S et al., Radiology: Artificial "
        "Intelligence 2020;2(4):e200048.",
        "Zone score: each third (upper, middle, lower) of each lung gets 0 (no infection), 1 (< 25 %), 2 (25-50 %), "
        "3 (50-75 %) or 4 (>= 75 % infected); the sum is 0-24. Wu J et al., Investigative Radiology "
        "2020;55(5):257-261. Here the thirds are geometric (equal heights of each lung), not the paper's "
        "carina / inferior pulmonary vein levels.",
        "Zones ventral/dorsal are the anterior/posterior halves of each lung. Volumes count voxels; right and left "
        "are the patient's.",
    ]


def warnings_of(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(str(w["code"]), str(w["message"])) for w in report.get("warnings", [])]


# -------------------------------------------------------------------------------------------------------------
# Pictures
# -------------------------------------------------------------------------------------------------------------

def _rgb(seg) -> np.ndarray:
    return np.asarray(seg.color_rgb255, dtype=np.float32)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """The inner rim of ``mask``, about 1/170 of the picture wide (3 pixels on a 512 slice) so that the outline
    shows on screen and in print at the size the report gives a slice."""
    from scipy import ndimage

    width = max(2, int(round(max(mask.shape) / 170)))
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def _square(array: np.ndarray, spacing_rc: Sequence[float], order: int) -> np.ndarray:
    """Resample a 2D array to square pixels of the smaller spacing (``order`` 0 for masks, 1 for HU)."""
    from scipy import ndimage

    target = min(spacing_rc)
    factors = [s / target for s in spacing_rc]
    if all(abs(f - 1) < 1e-3 for f in factors):
        return array
    out = ndimage.zoom(array.astype(np.float32) if order else array.astype(np.uint8), factors, order=order,
                       mode="nearest", grid_mode=True)
    return out if order else out.astype(bool)


def compose(hu: np.ndarray, right: np.ndarray, left: np.ndarray, infection: Optional[np.ndarray]) -> np.ndarray:
    """An RGB uint8 picture: the slice in the lung window, the lungs outlined, the infection filled and outlined,
    each in its terminology colour."""
    level, width = LUNG_WINDOW
    grey = np.clip((hu.astype(np.float32) - (level - width / 2)) / width, 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if infection is not None and infection.any():
        rgb[infection] = (1 - INFECTION_ALPHA) * rgb[infection] + INFECTION_ALPHA * _rgb(SEGMENTS.infection)
    for mask, seg in ((right, SEGMENTS.right_lung), (left, SEGMENTS.left_lung)):
        rgb[_boundary(mask)] = _rgb(seg)
    if infection is not None and infection.any():
        rgb[_boundary(infection)] = _rgb(SEGMENTS.infection)
    return np.round(rgb).astype(np.uint8)


def _crop_box(counts: Sequence[np.ndarray], spacing_zyx: Sequence[float]) -> tuple[slice, slice, slice]:
    """(z, y, x) slices around the lungs (``counts``: their voxels per index of each axis, from
    :func:`~.preprocessing.axis_counts`) with :data:`MARGIN_MM` on each side (the whole image without lungs)."""
    if not counts[0].any():
        return (slice(None),) * 3   # type: ignore[return-value]
    box = []
    for axis in range(3):
        hit = np.flatnonzero(counts[axis])
        margin = int(math.ceil(MARGIN_MM / float(spacing_zyx[axis])))
        box.append(slice(max(0, int(hit[0]) - margin), min(len(counts[axis]), int(hit[-1]) + margin + 1)))
    return tuple(box)  # type: ignore[return-value]


def key_views(volume, lungs: np.ndarray, infection: Optional[np.ndarray]) -> list[dict[str, Any]]:
    """The pictures of a case: a dict per view with ``title``, ``rgb`` (uint8) and ``markers`` (left, right,
    top labels) — three axial slices (one per third of the lungs) and one coronal slice."""
    hu = volume.hu
    sz, sy, sx = (float(s) for s in volume.spacing_zyx)
    inf = infection if infection is not None else np.zeros(lungs.shape, bool)
    # No full-size temporary: the lungs' extent is counted a few slices at a time, and the planes' right/left
    # masks are cut from the labels plane by plane (whole-scan masks were 0.5 GB more on a 1000-slice scan).
    lung_counts = axis_counts(lungs)
    zbox, ybox, xbox = _crop_box(lung_counts, volume.spacing_zyx)
    z_lung = np.flatnonzero(lung_counts[0])
    y_lung = np.flatnonzero(lung_counts[1])

    def planes_of(index: tuple) -> list[np.ndarray]:
        """HU, right lung, left lung and infection of one plane (``index`` into the (z, y, x) arrays)."""
        labels = lungs[index]
        return [hu[index], labels == LABEL_RIGHT_LUNG, labels == LABEL_LEFT_LUNG, inf[index]]
    views = []
    if z_lung.size:
        z0, z1 = int(z_lung[0]), int(z_lung[-1])
        height = z1 - z0 + 1
        per_slice, per_row, _ = axis_counts(inf)          # infected voxels per axial slice and per coronal row
        for part, name in ((2, "upper"), (1, "middle"), (0, "lower")):   # part index counts from the base
            lo = z0 + (part * height) // 3
            hi = max(lo, z0 + ((part + 1) * height) // 3 - 1)
            counts = per_slice[lo:hi + 1]
            k = lo + int(np.argmax(counts)) if counts.max(initial=0) > 0 else (lo + hi) // 2
            position = volume.image.TransformIndexToPhysicalPoint((0, 0, int(k)))[2]
            planes = planes_of((k, ybox, xbox))
            planes = [_square(p, (sy, sx), 1 if i == 0 else 0) for i, p in enumerate(planes)]
            views.append({"title": f"Axial, {name} third of the lungs (z = {position:.1f} mm, "
                                   f"{int(per_slice[k]) * sy * sx / 100:.1f} cm\u00b2 infected)",
                          "rgb": compose(*planes), "markers": ("R", "L", "A")})
        y = int(np.argmax(per_row)) if per_row.max(initial=0) > 0 else int(y_lung[len(y_lung) // 2])
        position = volume.image.TransformIndexToPhysicalPoint((0, y, 0))[1]
        # Coronal: rows are z; flip so that superior is at the top.
        planes = [p[::-1] for p in planes_of((zbox, y, xbox))]
        planes = [_square(p, (sz, sx), 1 if i == 0 else 0) for i, p in enumerate(planes)]
        where = "the most infected coronal plane" if per_row.max(initial=0) else "the middle of the lungs"
        views.append({"title": f"Coronal, through {where} (y = {position:.1f} mm)",
                      "rgb": compose(*planes), "markers": ("R", "L", "S")})
    return views


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    # zlib level 3, not Pillow's 6: on P001's four key views 0.045 s instead of 0.12 s, and 8 % smaller.
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG", optimize=False, compress_level=PNG_LEVEL)
    return buffer.getvalue()


# -------------------------------------------------------------------------------------------------------------
# Figures
# -------------------------------------------------------------------------------------------------------------

def _figure(size):
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=100)


def draw_chart(ax, report: Mapping[str, Any]) -> None:
    """Bar chart into ``ax``: infected percentage (PO, light) and high-opacity percentage (PHO, dark) of each
    lung, both lungs, and each zone of each lung, in the lungs' colours."""
    from matplotlib.patches import Patch

    q = report["quantification"]
    colours = {"right_lung": _rgb(SEGMENTS.right_lung) / 255, "left_lung": _rgb(SEGMENTS.left_lung) / 255,
               "both_lungs": np.array([0.62, 0.62, 0.62])}
    bars, ticks = [], []
    x = 0.0
    for key, label in _SIDES:
        bars.append((x, key, q[key]))
        ticks.append((x, "Both" if key == "both_lungs" else label.split()[0]))
        x += 1
    x += 0.6
    for zone in ("upper", "middle", "lower", "ventral", "dorsal"):
        for key in ("right_lung", "left_lung"):
            bars.append((x, key, q[key]["zones"][zone]))
            x += 0.8
        ticks.append((x - 1.2, zone))
        x += 0.5
    top = 0.0
    for xpos, key, entry in bars:
        po, pho = entry.get("infected_percent"), entry.get("high_opacity_percent")
        if po is None:
            continue
        ax.bar(xpos, po, width=0.72, color=colours[key], edgecolor="black", linewidth=0.4)
        if pho:
            ax.bar(xpos, pho, width=0.72, color=colours[key] * 0.55, edgecolor="black", linewidth=0.4)
        ax.text(xpos, po, f"{po:.1f}", ha="center", va="bottom", fontsize=6.5)
        top = max(top, po)
    ax.set_xticks([p for p, _ in ticks], [t for _, t in ticks], fontsize=7.5)
    ax.set_ylabel("% of the lung or zone", fontsize=8)
    ax.set_ylim(0, max(5.0, top * 1.18))
    ax.tick_params(axis="y", labelsize=7.5)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("Infected percentage per lung and zone (light: all opacity, dark: high opacity above -200 HU)",
                 fontsize=8.5, loc="left")
    ax.legend(handles=[Patch(color=colours[k], label=label) for k, label in _SIDES], fontsize=7, frameon=False,
              loc="upper right", ncol=3)
    ax.text(0.0, -0.16, "whole lungs", transform=ax.transAxes, fontsize=7, color="0.35", va="top")
    ax.text(0.3, -0.16, "zones: thirds (upper, middle, lower) and halves (ventral, dorsal); right | left",
            transform=ax.transAxes, fontsize=7, color="0.35", va="top")


def chart_figure(report: Mapping[str, Any], size=(7.4, 3.0)):
    """:func:`draw_chart` in a figure of its own (the HTML report's chart)."""
    fig = _figure(size)
    draw_chart(fig.add_axes([0.08, 0.22, 0.9, 0.66]), report)
    return fig


def views_figure(views: Sequence[Mapping[str, Any]], size=A4):
    """The key slices, two per row at the width of half the page (heights from each picture's own aspect),
    each with its title and orientation markers, then the legend."""
    from matplotlib.patches import Patch

    fig = _figure(size)
    fig.text(0.5, 0.975, "Key slices", ha="center", va="top", fontsize=12, weight="bold")
    fig.text(0.5, 0.955, "Lung window (level -600 HU, width 1500 HU); radiological convention: the patient's right on "
                         "the image's left", ha="center", va="top", fontsize=8, color="0.3")
    width, gap, title = 0.46, 0.025, 0.022
    page_ratio = size[0] / size[1]
    y = 0.935
    for start in range(0, len(views), 2):
        row = views[start:start + 2]
        heights = [width * page_ratio * v["rgb"].shape[0] / v["rgb"].shape[1] for v in row]
        top = y - title
        for column, (view, height) in enumerate(zip(row, heights)):
            x = 0.03 + column * (width + 0.02)
            ax = fig.add_axes([x, top - height, width, height])
            ax.imshow(view["rgb"], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(view["title"], fontsize=7.5)
            left, right, up = view["markers"]
            box = {"boxstyle": "square,pad=0.15", "facecolor": "black", "edgecolor": "none", "alpha": 0.75}
            for text, (tx, ty, ha, va) in ((left, (0.015, 0.5, "left", "center")), (right, (0.985, 0.5, "right", "center")),
                                           (up, (0.5, 0.985, "center", "top"))):
                ax.text(tx, ty, text, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=9,
                        weight="bold", bbox=box)
        y = top - max(heights) - gap
    handles = [Patch(facecolor="none", edgecolor=_rgb(s) / 255, linewidth=2.5, label=f"{s.name} (outline)")
               for s in (SEGMENTS.right_lung, SEGMENTS.left_lung)]
    handles.append(Patch(facecolor=_rgb(SEGMENTS.infection) / 255, edgecolor=_rgb(SEGMENTS.infection) / 255,
                         label=f"{SEGMENTS.infection.name} (filled, outlined)"))
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=8.5, frameon=False,
               bbox_to_anchor=(0.5, y + 0.005))
    fig.text(0.5, y - 0.03, _wrap("Each axial slice is the one with the most infection in its third of the lungs (the "
                                  "third's middle slice when it has none); z is the slice's position along the "
                                  "patient's axis (DICOM patient coordinates), y the coronal plane's.", 130),
             ha="center", va="top", fontsize=7.5, color="0.3")
    return fig


def _table(fig, rect, header: Sequence[str], rows: Sequence[Sequence[str]], col_widths=None, fontsize=8.0):
    ax = fig.add_axes(rect)
    ax.axis("off")
    table = ax.table(cellText=[list(r) for r in rows], colLabels=list(header), loc="upper left",
                     cellLoc="left", colLoc="left", colWidths=col_widths, bbox=[0, 0, 1, 1])
    table.auto_set_font_size(False)
    table.set_fontsize(fontsize)
    for (row, _col), cell in table.get_celld().items():
        cell.set_linewidth(0.3)
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#eeeeee")
    return ax


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def summary_pages(report: Mapping[str, Any]) -> list:
    """Page 1 (and a second when the warnings are many): identifiers, the not-for-diagnosis line, results, zones,
    chart, warnings, models, definitions."""
    fig = _figure(A4)
    fig.text(0.05, 0.97, "Lung and COVID-19 infection CT report", fontsize=15, weight="bold", va="top")
    fig.text(0.05, 0.945, f"Case {report.get('case', '')}  \u2022  generated {_dt.date.today().isoformat()}",
             fontsize=8.5, color="0.3", va="top")
    fig.text(0.05, 0.925, _wrap(NOT_FOR_DIAGNOSIS, 105), fontsize=8, color="#b00020", weight="bold", va="top")
    y = 0.895
    ids = identifiers(report)
    for label, value in ids:
        fig.text(0.05, y, label, fontsize=8, weight="bold", va="top")
        fig.text(0.22, y, _wrap(value, 100), fontsize=8, va="top")
        y -= 0.0155 * max(1, _wrap(value, 100).count("\n") + 1)
    y -= 0.01
    header, rows = result_rows(report)
    height = 0.022 * (len(rows) + 1)
    _table(fig, [0.05, y - height, 0.9, height], header, rows, col_widths=[0.16, 0.16, 0.16, 0.17, 0.2, 0.15])
    y -= height + 0.012
    header, rows = zone_rows(report)
    height = 0.02 * (len(rows) + 1)
    _table(fig, [0.05, y - height, 0.9, height], header, rows, fontsize=7.5)
    y -= height + 0.005
    if infection_measured(report):
        chart = 0.25
        draw_chart(fig.add_axes([0.09, y - chart + 0.05, 0.86, chart - 0.08]), report)
        y -= chart + 0.01
    else:
        fig.text(0.05, y - 0.01, NO_CHART, fontsize=8, color="0.3", va="top")
        y -= 0.035
    pages = [fig]

    def room(height: float) -> None:
        """Continue on a new page when ``height`` does not fit above the bottom margin (many long warnings)."""
        nonlocal fig, y
        if y - height < 0.04:
            fig = _figure(A4)
            pages.append(fig)
            fig.text(0.05, 0.97, f"Case {report.get('case', '')} (continued)", fontsize=9, color="0.3", va="top")
            y = 0.94

    def line(x: float, text: str, size: float, step: float, **style) -> None:
        nonlocal y
        room(step * (text.count("\n") + 1))
        fig.text(x, y, text, fontsize=size, va="top", **style)
        y -= step * (text.count("\n") + 1) + 0.003

    line(0.05, "Quality warnings", 9, 0.014, weight="bold")
    warnings = warnings_of(report) or [("", "none: no coverage, slice, volume, balance, border, contrast or metal "
                                             "problem was found")]
    for code, message in warnings:
        line(0.06, _wrap(("\u26a0 " if code else "") + message, 130), 7.2, 0.0125,
             color="#8a4b00" if code else "0.2")
    y -= 0.006
    for label, value in model_rows(report):
        text = _wrap(value, 105)
        room(0.0125 * (text.count("\n") + 1))
        fig.text(0.05, y, label, fontsize=7.5, weight="bold", va="top")
        line(0.22, text, 7.5, 0.0125)
    y -= 0.006
    for definition in definitions():
        line(0.05, _wrap(definition, 140), 6.5, 0.0108, color="0.3")
    return pages


# -------------------------------------------------------------------------------------------------------------
# Writers
# -------------------------------------------------------------------------------------------------------------

def render_case_pdf(report: Mapping[str, Any], views: Sequence[Mapping[str, Any]]) -> bytes:
    from matplotlib import rc_context
    from matplotlib.backends.backend_pdf import PdfPages

    buffer = io.BytesIO()
    # Type 3 fonts (matplotlib's default): the text stays text (pypdfium2 extracts the same text as from Type 42
    # TrueType), and the PDF is written faster (Type 42 subsets every TrueType font with fontTools).
    with rc_context({"pdf.fonttype": 3}):
        with PdfPages(buffer, metadata={"Title": f"COVIDLesionSeg report: {report.get('case', '')}",
                                        "Creator": f"COVIDLesionSeg {__version__}",
                                        "Subject": NOT_FOR_DIAGNOSIS}) as pdf:
            for page in summary_pages(report):
                pdf.savefig(page)
            if views:
                pdf.savefig(views_figure(views))
    return buffer.getvalue()


def _figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, pil_kwargs={"compress_level": PNG_LEVEL})
    return buffer.getvalue()


def _img(png: bytes, alt: str, width: Optional[int] = None) -> str:
    size = f' style="max-width:{width}px;width:100%"' if width else ""
    return (f'<img alt="{html.escape(alt)}"{size} src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}">')


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""   # label/value lists have no header
    return f"<table>{thead}<tbody>{body}</tbody></table>"


_CSS = """body{font-family:DejaVu Sans,Arial,sans-serif;margin:24px;max-width:1000px;color:#222}
h1{font-size:22px;margin-bottom:4px}h2{font-size:16px;margin-top:22px}
.warn{color:#b00020;font-weight:bold;border:2px solid #b00020;padding:6px 10px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px;text-align:left}
th{background:#eee}.qw li{color:#8a4b00;margin-bottom:4px}.views{display:grid;grid-template-columns:1fr 1fr;gap:12px}
figure{margin:0}figcaption{font-size:12px}small{color:#555}"""


def render_case_html(report: Mapping[str, Any], views: Sequence[Mapping[str, Any]],
                     chart_png: Optional[bytes]) -> bytes:
    case = html.escape(str(report.get("case", "")))
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{GENERATOR}">',
             f"<title>COVIDLesionSeg report: {case}</title><style>{_CSS}</style></head><body>",
             "<h1>Lung and COVID-19 infection CT report</h1>",
             f"<p><small>Case {case} &bull; generated {_dt.date.today().isoformat()}</small></p>",
             f'<p class="warn">{html.escape(NOT_FOR_DIAGNOSIS)}</p>',
             "<h2>Identification</h2>", _html_table(["", ""], identifiers(report)),
             "<h2>Results</h2>", _html_table(*result_rows(report)),
             "<h2>Zones (the six zones of the score)</h2>", _html_table(*zone_rows(report)),
             _img(chart_png, "bar chart of the infected percentage per lung and zone", 900) if chart_png
             else f"<p><small>{html.escape(NO_CHART)}</small></p>",
             "<h2>Quality warnings</h2>"]
    warnings = warnings_of(report)
    parts.append('<ul class="qw">' + "".join(f"<li><b>{html.escape(c)}</b>: {html.escape(m)}</li>" for c, m in warnings)
                 + "</ul>" if warnings else "<p>None: no coverage, slice, volume, balance, border, contrast or metal "
                                            "problem was found.</p>")
    parts.append("<h2>Key slices</h2><p><small>Lung window (level -600 HU, width 1500 HU); the patient's right on "
                 "the image's left. " + " ".join(
                     f'<span style="color:rgb{s.color_rgb255}">&#9632;</span> {html.escape(s.name)}' for s in SEGMENTS)
                 + '</small></p><div class="views">')
    for view in views:
        parts.append(f"<figure>{_img(_png(view['rgb']), view['title'])}"
                     f"<figcaption>{html.escape(view['title'])}</figcaption></figure>")
    parts.append("</div><h2>Models</h2>" + _html_table(["", ""], model_rows(report)))
    parts.append("<h2>Definitions</h2>" + "".join(f"<p><small>{html.escape(d)}</small></p>" for d in definitions()))
    parts.append("</body></html>\n")
    return "".join(parts).encode("utf-8")


def write_case_report(pdf_path: str | Path, html_path: str | Path, report: Mapping[str, Any], volume,
                      lungs: np.ndarray, infection: Optional[np.ndarray]) -> tuple[Path, Path]:
    """Write ``<case>_report.pdf`` and ``<case>_report.html`` (each atomic and read back).

    ``report`` is the case's JSON report; ``volume`` its :class:`~.volume.CTVolume`; ``lungs`` and
    ``infection`` the canonical masks (``infection`` None with lungs only).
    """
    from .outputs import atomic_write_bytes

    views = key_views(volume, lungs, infection)
    pdf = render_case_pdf(report, views)
    chart = _figure_png(chart_figure(report)) if infection_measured(report) else None
    page = render_case_html(report, views, chart)
    return atomic_write_bytes(pdf_path, pdf), atomic_write_bytes(html_path, page)


def write_case_report_from_masks(pdf_path: str | Path, html_path: str | Path, report: Mapping[str, Any], image,
                                 masks: Mapping[str, np.ndarray]) -> tuple[Path, Path]:
    """:func:`write_case_report` from the CT as an image on its input grid (``sitk.Image``) and the segments as
    masks on that grid (segment name -> bool (z, y, x); what the Slicer module and ``batch.py`` hold)."""
    from .quantify import canonical_masks

    volume, lungs, infection = canonical_masks(image, masks, name=str(report.get("case", "case")))
    return write_case_report(pdf_path, html_path, report, volume, lungs, infection)


# -------------------------------------------------------------------------------------------------------------
# The batch summary
# -------------------------------------------------------------------------------------------------------------

def _float(text: str) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def distribution_figure(rows: Sequence[Mapping[str, str]]):
    """Percentage of opacity per case (sorted dots) and the histogram of the zone scores."""
    fig = _figure((8.0, 3.0))
    ok = [r for r in rows if r.get("status") == "ok" and _float(r.get("both_po_pct")) is not None]
    ax = fig.add_axes([0.2, 0.18, 0.36, 0.7])
    ordered = sorted(ok, key=lambda r: _float(r["both_po_pct"]))
    values = [_float(r["both_po_pct"]) for r in ordered]
    ax.scatter(values, range(len(values)), color=_rgb(SEGMENTS.infection) / 255, edgecolor="black", zorder=3)
    ax.set_yticks(range(len(values)), [r["case"][:24] for r in ordered], fontsize=7)
    ax.set_xlabel("percentage of opacity, both lungs (%)", fontsize=8)
    ax.set_xlim(0, max([5.0] + [v * 1.15 for v in values]))
    ax.set_ylim(-0.8, max(0.8, len(values) - 0.2))
    ax.grid(axis="x", color="0.9")
    ax.set_title(f"Percentage of opacity ({len(values)} cases)", fontsize=9, loc="left")
    ax2 = fig.add_axes([0.65, 0.18, 0.32, 0.7])
    scores = [_float(r.get("zone_score")) for r in ok if _float(r.get("zone_score")) is not None]
    ax2.hist(scores, bins=np.arange(-0.5, 25.5, 1.0), color=_rgb(SEGMENTS.infection) / 255, edgecolor="black")
    ax2.set_xlim(-0.5, 24.5)
    ax2.set_xlabel("zone score (0-24)", fontsize=8)
    ax2.set_ylabel("cases", fontsize=8)
    ax2.set_title("Zone scores", fontsize=9, loc="left")
    for a in (ax, ax2):
        a.tick_params(labelsize=7)
        a.spines[["top", "right"]].set_visible(False)
    return fig


def render_batch_html(rows: Sequence[Mapping[str, str]], folder: Path) -> bytes:
    header = ["Case", "Status", "Right lung (mL)", "Left lung (mL)", "Both (mL)", "Opacity PO (%)",
              "High opacity PHO (%)", "Zone score", "Warnings"]
    body = []
    for row in rows:
        case = str(row.get("case", ""))
        page = folder / f"{case}_report.html"
        link = (f'<a href="{html.escape(page.name)}">{html.escape(case)}</a>' if page.is_file() and row.get("status") == "ok"
                else html.escape(case))
        if row.get("status") == "ok":
            cells = [row.get("right_lung_ml"), row.get("left_lung_ml"), row.get("both_lungs_ml"), row.get("both_po_pct"),
                     row.get("both_pho_pct"), row.get("zone_score"), row.get("warnings", "").replace(" ", ", ")]
            cells = [html.escape(_dash(c)) for c in cells]
        else:
            cells = [f'<span style="color:#b00020">{html.escape(str(row.get("error", "")))}</span>'] + [""] * 6
            cells = [f'<td colspan="7">{cells[0]}</td>']
        status = html.escape(str(row.get("status", "")))
        tds = "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells)
        body.append(f"<tr><td>{link}</td><td>{status}</td>{tds}</tr>")
    ok = sum(1 for r in rows if r.get("status") == "ok")
    failed = len(rows) - ok
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{GENERATOR}">',
             f"<title>COVIDLesionSeg batch report</title><style>{_CSS}</style></head><body>",
             "<h1>Lung and COVID-19 infection CT: batch summary</h1>",
             f"<p><small>{html.escape(str(folder))} &bull; {ok} case(s) segmented, {failed} failed &bull; generated "
             f"{_dt.datetime.now().isoformat(timespec='minutes')} by COVIDLesionSeg {__version__}</small></p>",
             f'<p class="warn">{html.escape(NOT_FOR_DIAGNOSIS)}</p>',
             f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"]
    # A distribution needs two cases: one case's figure would repeat its row (and cost 0.3 s of a single-scan
    # run: matplotlib's Agg rendering); its own report has the slices.
    if ok >= MIN_CASES_FOR_DISTRIBUTION:
        parts.append("<h2>Distribution over the cases</h2>" + _img(_figure_png(distribution_figure(rows)),
                                                                   "distribution of the percentage of opacity and "
                                                                   "of the zone score", 900))
    parts.append("<h2>Definitions</h2>" + "".join(f"<p><small>{html.escape(d)}</small></p>" for d in definitions()))
    parts.append("<p><small>Each case's own report (PDF and HTML) shows its slices, warnings and models; "
                 "results.csv holds every number.</small></p></body></html>\n")
    return "".join(parts).encode("utf-8")


def write_batch_report(folder: str | Path) -> Optional[Path]:
    """Write ``report.html`` in an output folder from its ``results.csv`` (atomic, under the folder's lock).

    Returns None without writing when there is no ``results.csv`` or when a ``report.html`` that this tool did
    not write is there (a user's file is never replaced).
    """
    from .outputs import RESULTS_FILE, atomic_write_bytes, folder_lock, read_results_csv

    folder = Path(folder)
    target = folder / BATCH_REPORT
    with folder_lock(folder):
        if not (folder / RESULTS_FILE).is_file():
            return None
        if target.exists() and f'content="{GENERATOR}"' not in target.read_text(encoding="utf-8", errors="replace")[:2000]:
            return None
        rows = read_results_csv(folder / RESULTS_FILE)
        return atomic_write_bytes(target, render_batch_html(rows, folder))
