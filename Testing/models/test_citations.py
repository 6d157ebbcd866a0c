"""One citation table: every paper named in the code, the configs and the shipped models resolves to it, and
docs/CITATIONS.md shows the same table."""

from __future__ import annotations

import re

import pytest

from COVIDLesionSegLib.models import architectures
from COVIDLesionSegLib.models.citations import BY_NUMBER, CITATIONS, citation, citation_keys, cite
from Testing.conftest import REPO_ROOT

#: The internal file ids the papers were once named by; nothing in the repository may use them any more.
INTERNAL_ID = re.compile(rb"[0-9]{3}_[0-9a-f]{16}")


def _resolves(paper: str) -> bool:
    """Every comma-separated part of a ``paper`` field starts with a known key, or is a remark after one."""
    keys = citation_keys(paper)
    return bool(keys) and paper.split(",")[0].split()[0] in CITATIONS


def test_every_architecture_cites_a_listed_paper():
    archs = {a: arch for a, arch in architectures().items() if arch.paper != "test"}   # test-only registrations
    assert {"nnunet", "hybrid_encoder_unet", "ncovsegnet", "grid_unet"} <= set(archs)
    for arch_id, arch in archs.items():
        assert _resolves(arch.paper), (arch_id, arch.paper)


def test_every_procedure_cites_a_listed_paper():
    from training.procedures import procedures

    shipped = {n: c for n, c in procedures().items() if c.__module__.startswith("training.procedures")}
    assert {"supervised", "hybrid_encoder", "collaborative", "ncovsegnet", "grid004"} <= set(shipped)
    for name, cls in shipped.items():     # not the ones other tests register
        assert _resolves(cls.paper), (name, cls.paper)


def test_every_config_paper_field_resolves():
    from training.config import CONFIG_DIR, load_config

    checked = 0
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        paper = load_config(path, validate_it=False).get("paper") or ""
        if paper:
            assert _resolves(paper), (path.name, paper)
            checked += 1
    assert checked >= 10


def test_cite_and_lookup():
    assert cite("wang_hybrid_encoder") == "Wang et al., CMPB 2021, arXiv:2006.13877v2"
    assert cite("wang_hybrid_encoder (protocol), issue 5 CPU protocol") == \
        "Wang et al., CMPB 2021, arXiv:2006.13877v2 (protocol); issue 5 CPU protocol"
    assert citation("003").key == "liu_ncovsegnet" and citation("liu_ncovsegnet").venue == "Medical Image Analysis"
    assert set(BY_NUMBER) == {"000", "001", "002", "003", "004"}
    with pytest.raises(ValueError, match="docs/CITATIONS.md"):
        citation("005")


def test_docs_table_matches_the_python_table():
    text = (REPO_ROOT / "docs" / "CITATIONS.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z_]+)` \|.*$", text, re.M)}
    assert set(rows) == set(CITATIONS)
    for key, c in CITATIONS.items():
        cells = [cell.strip() for cell in rows[key].strip("|").split("|")]
        assert cells[1] == c.number, key
        if c.arxiv:
            assert f"arXiv:{c.arxiv}" in cells[6], key
        if c.venue:
            assert cells[4] == c.venue, key
        if c.year:
            assert cells[5] == c.year, key
        assert cells[2] == "the same authors" or cells[2].startswith(c.authors[0]), key


def test_no_internal_paper_ids_left_in_the_package_or_training():
    """What ``grep -rE "[0-9]{3}_[0-9a-f]{16}" COVIDLesionSeg training`` checks, binary model files included."""
    found = []
    for top in ("COVIDLesionSeg", "training"):
        for path in (REPO_ROOT / top).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and INTERNAL_ID.search(path.read_bytes()):
                found.append(str(path.relative_to(REPO_ROOT)))
    assert found == []


def test_old_style_paper_ids_are_replaced_by_their_keys():
    from COVIDLesionSegLib.models.citations import with_keys

    old = "0" * 2 + "0_" + "3744cab93325e79b"          # split so that this file passes the check above
    assert with_keys(f"{old} (protocol), issue 5 CPU protocol") == "wang_hybrid_encoder (protocol), issue 5 CPU protocol"
    assert with_keys("zhang_collaborative") == "zhang_collaborative" and with_keys("") == ""
    assert not INTERNAL_ID.search(with_keys(f"{old}, 004_0123456789abcdef").encode())
