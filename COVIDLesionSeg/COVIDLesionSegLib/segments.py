"""The three output segments as data: names, label values, colours and standard terminology.

One definition serves every output: the ``.seg.nrrd`` writer (segment names, colours, ``TerminologyEntry``
tags), the labelmap files (label values, see the label convention in ``COVIDLesionSegLib/__init__.py``),
the MRML adapter (segments of a ``vtkMRMLSegmentationNode``) and the project's terminology file
``Resources/COVIDLesionSeg.term.json`` (checked against this module by the tests).

Codes (SNOMED CT, coding scheme designator "SCT", as DICOM uses them):

- lungs: category 123037004 "Anatomical Structure", type 39607008 "Lung", type modifier 24028007 "Right"
  or 7771000 "Left" (the same codes as Slicer's "3D Slicer General Anatomy list").
- infection: category 49755003 "Morphologically Altered Structure", type 47351003 "Infiltrate",
  type modifier 840539006 "COVID-19", anatomic region 39607008 "Lung" (no laterality: lesions lie in both
  lungs). The region is looked up in Slicer's stock region context "Anatomic codes - DICOM master list",
  which contains "Lung"; our own terminology file only adds the category/type/modifier entries.

Code meanings use DICOM's capitalisation (CID 7150: "Anatomical Structure", "Morphologically Altered
Structure"); Slicer and DICOM compare codes by scheme and value only, the meaning is for display.

Colours: Slicer's GenericAnatomyColors table gives both lungs the same colour (197, 165, 145). We keep it
for the right lung and give the left lung a light blue so that the two lungs can be told apart in slice
views and 3D; the infection is a saturated amber that stands out against both lungs and against the grey
CT. Colours are stored as RGB in [0, 1] (Slicer's segment colour); the term file stores 0-255 integers.

Terminology entry string (the ``TerminologyEntry`` segment tag), as written and parsed by Slicer 5.x
``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry`` / ``DeserializeTerminologyEntry``::

    contextName~category~type~typeModifier~regionContextName~region~regionModifier

where each coded item is ``CodingSchemeDesignator^CodeValue^CodeMeaning`` and an absent one is ``^^``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

from . import LABEL_INFECTION, LABEL_LEFT_LUNG, LABEL_RIGHT_LUNG

#: Context name of ``Resources/COVIDLesionSeg.term.json`` (its "SegmentationCategoryTypeContextName").
TERMINOLOGY_CONTEXT_NAME = "Segmentation category and type - COVIDLesionSeg"
#: Slicer's stock anatomic region context (it ships with every Slicer; it contains SCT 39607008 "Lung").
REGION_CONTEXT_NAME = "Anatomic codes - DICOM master list"
#: Name of the segment tag that holds the serialised terminology entry (``vtkSegment::GetTerminologyEntryTagName``).
TERMINOLOGY_TAG = "TerminologyEntry"

TERMINOLOGY_FILE = Path(__file__).resolve().parents[1] / "Resources" / "COVIDLesionSeg.term.json"


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM code sequence item): scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str

    def triplet(self) -> str:
        """``scheme^value^meaning``, the item format inside a Slicer terminology entry string."""
        for part in (self.scheme, self.value, self.meaning):
            if "^" in part or "~" in part or "|" in part:
                raise ValueError(f"code {self} contains a separator character (^, ~ or |)")
        return f"{self.scheme}^{self.value}^{self.meaning}"


EMPTY_TRIPLET = "^^"

# SNOMED CT codes (see module docstring).
SCT_ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
SCT_LUNG = Code("SCT", "39607008", "Lung")
SCT_RIGHT = Code("SCT", "24028007", "Right")
SCT_LEFT = Code("SCT", "7771000", "Left")
SCT_MORPHOLOGICALLY_ALTERED_STRUCTURE = Code("SCT", "49755003", "Morphologically Altered Structure")
SCT_INFILTRATE = Code("SCT", "47351003", "Infiltrate")
SCT_COVID19 = Code("SCT", "840539006", "COVID-19")


@dataclass(frozen=True)
class SegmentDef:
    """One output segment.

    Attributes:
        id: segment ID inside a ``.seg.nrrd`` / ``vtkSegmentation`` (stable, ASCII, no spaces).
        name: segment name shown to users.
        label: value of this segment in single-file labelmaps (label convention of the package).
        color: display colour, RGB in [0, 1].
        category, type, type_modifier, region, region_modifier: standard terminology codes.
        slicer_label: the term file's "3dSlicerLabel" (lets Slicer find the term by a plain name).
    """

    id: str
    name: str
    label: int
    color: tuple[float, float, float]
    category: Code
    type: Code
    type_modifier: Optional[Code] = None
    region: Optional[Code] = None
    region_modifier: Optional[Code] = None
    slicer_label: str = ""

    @property
    def color_rgb255(self) -> tuple[int, int, int]:
        return tuple(int(round(c * 255)) for c in self.color)  # type: ignore[return-value]

    def terminology_entry(self, context_name: str = TERMINOLOGY_CONTEXT_NAME,
                          region_context_name: str = REGION_CONTEXT_NAME) -> str:
        """Slicer's serialised terminology entry for the segment's ``TerminologyEntry`` tag."""
        return terminology_entry_string(context_name, self.category, self.type, self.type_modifier,
                                        region_context_name, self.region, self.region_modifier)


def _rgb(r: int, g: int, b: int) -> tuple[float, float, float]:
    # Colours are chosen as 0-255 integers so that the term file (integers) and the segment colour
    # (floats) describe exactly the same colour.
    return (r / 255.0, g / 255.0, b / 255.0)


RIGHT_LUNG = SegmentDef(
    id="right_lung", name="Right lung", label=LABEL_RIGHT_LUNG, color=_rgb(197, 165, 145),
    category=SCT_ANATOMICAL_STRUCTURE, type=SCT_LUNG, type_modifier=SCT_RIGHT, slicer_label="right lung")
LEFT_LUNG = SegmentDef(
    id="left_lung", name="Left lung", label=LABEL_LEFT_LUNG, color=_rgb(141, 182, 205),
    category=SCT_ANATOMICAL_STRUCTURE, type=SCT_LUNG, type_modifier=SCT_LEFT, slicer_label="left lung")
INFECTION = SegmentDef(
    id="covid19_infection", name="COVID-19 infection", label=LABEL_INFECTION, color=_rgb(250, 176, 20),
    category=SCT_MORPHOLOGICALLY_ALTERED_STRUCTURE, type=SCT_INFILTRATE, type_modifier=SCT_COVID19,
    region=SCT_LUNG, slicer_label="covid-19 infection")

class Segments(NamedTuple):
    """The output segments: iterable in file order, or by role (``SEGMENTS.infection.name``)."""

    right_lung: SegmentDef
    left_lung: SegmentDef
    infection: SegmentDef


#: The output segments in file order (right lung, left lung, infection).
SEGMENTS = Segments(RIGHT_LUNG, LEFT_LUNG, INFECTION)


def segment_by_name(name: str) -> SegmentDef:
    """The segment definition with this name (case-insensitive); ValueError listing the names otherwise."""
    for seg in SEGMENTS:
        if seg.name.lower() == name.lower():
            return seg
    raise ValueError(f"unknown segment {name!r}; known segments: {', '.join(s.name for s in SEGMENTS)}")


def segment_by_label(label: int) -> SegmentDef:
    for seg in SEGMENTS:
        if seg.label == label:
            return seg
    raise ValueError(f"no segment has label value {label}; labels: "
                     + ", ".join(f"{s.label}={s.name}" for s in SEGMENTS))


def terminology_entry_string(context_name: str, category: Code, type_: Code, type_modifier: Optional[Code],
                             region_context_name: str = "", region: Optional[Code] = None,
                             region_modifier: Optional[Code] = None) -> str:
    """Serialise a terminology entry the way Slicer does (see the module docstring for the format)."""
    if "~" in context_name or "~" in region_context_name:
        raise ValueError("terminology context names must not contain '~'")

    def item(code: Optional[Code]) -> str:
        return code.triplet() if code is not None else EMPTY_TRIPLET

    return "~".join([context_name, item(category), item(type_), item(type_modifier),
                     region_context_name, item(region), item(region_modifier)])


def parse_terminology_entry(entry: str) -> dict[str, object]:
    """Parse a Slicer terminology entry string into its parts (inverse of :func:`terminology_entry_string`).

    Returns a dict with keys ``context``, ``category``, ``type``, ``type_modifier``, ``region_context``,
    ``region``, ``region_modifier``; coded items are :class:`Code` or None when empty.
    """
    parts = entry.split("~")
    if len(parts) != 7:
        raise ValueError(f"not a terminology entry (expected 7 '~'-separated fields, got {len(parts)}): {entry!r}")

    def code(text: str) -> Optional[Code]:
        fields = text.split("^")
        if len(fields) != 3:
            raise ValueError(f"bad coded item {text!r} in terminology entry {entry!r} (expected scheme^value^meaning)")
        if not fields[0] and not fields[1]:
            return None
        return Code(*fields)

    return {"context": parts[0], "category": code(parts[1]), "type": code(parts[2]),
            "type_modifier": code(parts[3]), "region_context": parts[4], "region": code(parts[5]),
            "region_modifier": code(parts[6])}
