"""The papers this project implements: one citation table for the whole repository.

The model registry (``Architecture.paper``), the training procedures (``Procedure.paper``, printed by
``python -m training procedures``), the configs' ``paper:`` fields and the docstrings name a paper by its
key here; ``docs/CITATIONS.md`` is the same table for readers (``Testing/models/test_citations.py`` keeps
the two in step). ``number`` is the project's older shorthand (000 ... 004), still part of a few names
(``grid004``, the ``bizopoulos_004`` pipeline) and of prose such as "004's grid".

Every fact below is taken from the papers' own text; where a text does not state something (a DOI, the
venue of a preprint), the field is empty and ``note`` says so rather than guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Citation:
    key: str                       # short, stable id used in code and configs
    number: str                    # the project's shorthand, "000" ... "004"
    authors: tuple[str, ...]
    title: str
    venue: str                     # "" where the text names none
    year: str
    arxiv: str = ""                # arXiv identifier as printed in the paper, e.g. "2006.13877v2"
    doi: str = ""
    method: str = ""               # what the project takes from it, in a few words
    note: str = ""

    @property
    def first_author(self) -> str:
        return self.authors[0].split()[-1]

    def short(self) -> str:
        """"Wang et al., CMPB 2021, arXiv:2006.13877v2" (what listings print)."""
        where = " ".join(p for p in (self.venue_short, self.year) if p)
        parts = [f"{self.first_author} et al.", where, f"arXiv:{self.arxiv}" if self.arxiv else "",
                 f"doi:{self.doi}" if self.doi else ""]
        return ", ".join(p for p in parts if p)

    @property
    def venue_short(self) -> str:
        return _VENUE_ABBREVIATIONS.get(self.venue, self.venue)


_VENUE_ABBREVIATIONS = {"Computer Methods and Programs in Biomedicine": "CMPB",
                        "Medical Image Analysis": "MedIA", "arXiv preprint": "arXiv preprint"}

_WANG_AUTHORS = ("Yixin Wang", "Yao Zhang", "Yang Liu", "Jiang Tian", "Cheng Zhong", "Zhongchao Shi",
                 "Yang Zhang", "Zhiqiang He")
_WANG_TITLE = ("Does Non-COVID19 Lung Lesion Help? Investigating Transferability in COVID-19 CT Image "
               "Segmentation")

CITATIONS: dict[str, Citation] = {c.key: c for c in (
    Citation("wang_hybrid_encoder", "000", _WANG_AUTHORS, _WANG_TITLE,
             "Computer Methods and Programs in Biomedicine", "2021", arxiv="2006.13877v2",
             method="3D nnU-Net baseline, multi-lesion pre-training, four transfer strategies, Hybrid-encoder "
                    "with Selective Fusion; DSC/NSD protocol on COVID-19-CT-Seg",
             note="the arXiv v2 text says 'Preprint submitted to Elsevier'; no DOI is printed in it"),
    Citation("wang_multi_encoder", "001", _WANG_AUTHORS, _WANG_TITLE, "arXiv preprint", "2020",
             arxiv="2006.13877v1",
             method="Multi-encoder: self-encoder + frozen adapted encoder, features concatenated",
             note="the version before v2 of the same arXiv entry (its text counts cases up to 13 June 2020 and "
                  "prints no identifier of its own)"),
    Citation("zhang_collaborative", "002",
             ("Yichi Zhang", "Qingcheng Liao", "Lin Yuan", "He Zhu", "Jiezhen Xing", "Jicong Zhang"),
             "Exploiting Shared Knowledge from Non-COVID Lesions for Annotation-Efficient COVID-19 CT Lung "
             "Infection Segmentation", "arXiv preprint", "2020", arxiv="2012.15564v1",
             method="relation-driven collaborative learning (general + target encoder, relation consistency); "
                    "the 3D U-Net layer table of its Table I"),
    Citation("liu_ncovsegnet", "003",
             ("Jiannan Liu", "Bo Dong", "Shuai Wang", "Hui Cui", "Deng-Ping Fan", "Jiquan Ma", "Geng Chen"),
             "COVID-19 lung infection segmentation with a novel two-stage cross-domain transfer learning "
             "framework", "Medical Image Analysis", "2021",
             method="nCoVSegNet (ECA-ResNet-50, GCA, DAF, deep supervision), two-stage transfer via LIDC-IDRI, "
                    "lung-region crop",
             note="available online 6 August 2021; no DOI or arXiv identifier is printed in the text; code: "
                  "https://github.com/Jiannan-Liu/nCoVSegNet (section 4.2)"),
    Citation("bizopoulos_grid", "004", ("Paschalis Bizopoulos", "Nicholas Vretos", "Petros Daras"),
             "Comprehensive Comparison of Deep Learning Models for Lung and COVID-19 Lesion Segmentation in CT "
             "scans", "", "",
             method="Unet/Linknet/FPN/PSPNet x encoder grid, random vs ImageNet init, lung / lesion A / lesion B",
             note="the text names no venue, year or identifier (its latest references are from 2020)"),
)}

#: The project's shorthand ("000" ...) -> key.
BY_NUMBER: dict[str, str] = {c.number: c.key for c in CITATIONS.values()}

_KEY = re.compile(r"^\s*([a-z][a-z0-9_]*)\b(.*)$", re.S)


def citation(key: str) -> Citation:
    """The citation of ``key`` (or of the shorthand "000" ...); ValueError naming the known keys."""
    key = BY_NUMBER.get(key, key)
    if key not in CITATIONS:
        raise ValueError(f"unknown paper {key!r}; known: {', '.join(CITATIONS)} (docs/CITATIONS.md)")
    return CITATIONS[key]


def citation_keys(paper: str) -> list[str]:
    """The citation keys named in a ``paper`` field: comma-separated parts, each a key optionally followed
    by a remark (``"wang_hybrid_encoder (protocol), issue 5 CPU protocol"`` -> ``["wang_hybrid_encoder"]``)."""
    keys = []
    for part in (paper or "").split(","):
        match = _KEY.match(part)
        if match and match.group(1) in CITATIONS:
            keys.append(match.group(1))
    return keys


def cite(paper: str) -> str:
    """A ``paper`` field with each key replaced by its short citation, remarks kept."""
    out = []
    for part in (paper or "").split(","):
        match = _KEY.match(part)
        if match and match.group(1) in CITATIONS:
            out.append(CITATIONS[match.group(1)].short() + match.group(2).rstrip())
        elif part.strip():
            out.append(part.strip())
    return "; ".join(out)


#: The ids papers had in the project before the keys (``"000_"`` and 16 hex digits); runs trained then still
#: carry them in their stored config.
_OLD_ID = re.compile(r"\b([0-9]{3})_[0-9a-f]{16}\b")


def with_keys(paper: str) -> str:
    """A ``paper`` field with each old-style id replaced by its key (``"000_<hex> (protocol)"`` ->
    ``"wang_hybrid_encoder (protocol)"``), so that what a run stored before the keys existed can be shipped."""
    return _OLD_ID.sub(lambda m: BY_NUMBER.get(m.group(1), m.group(0)), paper or "")


__all__ = ["BY_NUMBER", "CITATIONS", "Citation", "citation", "citation_keys", "cite", "with_keys"]
