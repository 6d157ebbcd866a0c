"""The default models out of the box (issue 6): the shipped manifest, ``models verify`` and the external check on
the two real COVID-CT-MD scans.

External check (the issue's targets, on scans no model saw in training):

- ``covidctmd_p001_ct``: the infection segmented by ``covidlesionseg segment`` with no ``--model`` is compared
  per axial slice with the radiologists' labels (``covidctmd_slice_labels.csv``). A slice counts as predicted
  infected when it holds at least one infection voxel - the plain reading of "predicted infection per axial
  slice"; no area threshold is tuned on this scan. Asserted: sensitivity >= 0.90 (issue 10's target) and
  specificity >= 0.85 (issue 6's; issue 10's 0.90 is not reached: 0.882, docs/default_models.md section 7.6).
- ``covidctmd_normal001_ct``: at most 0.2 % of the lung volume segmented as infection (issue 10).

Which model is the default is the manifest's choice (docs/default_models.md says why); these tests check
whatever the catalogue resolves, so a new default must meet the same targets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib import catalogue
from COVIDLesionSegLib.cli import main
from COVIDLesionSegLib.evaluation import read_slice_labels, slice_agreement
from COVIDLesionSegLib.models.checkpoint import file_sha256
from Testing.conftest import shared_file

MODELS_DIR = Path(catalogue.__file__).resolve().parent.parent / "Resources" / "Models"
SHIPPED_MANIFEST = MODELS_DIR / "manifest.json"
P001, NORMAL = "covidctmd_p001_ct", "covidctmd_normal001_ct"
LABEL_INFECTION = 3  # the labelmap's infection label (0 bg, 1 right lung, 2 left lung, 3 infection)


def _manifest() -> dict:
    return json.loads(SHIPPED_MANIFEST.read_text())


def slice_labels(file_name: str) -> dict[str, np.ndarray]:
    """The radiologists' per-slice labels of one COVID-CT-MD file (z, infected, right, left)."""
    return read_slice_labels(shared_file("ct/covidctmd_slice_labels.csv"), file_name)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`covidlesionseg segment` with no --model on the two COVID-CT-MD scans (one CLI batch)."""
    inputs = [str(shared_file(f"ct/{name}.nii.gz")) for name in (P001, NORMAL)]
    out = tmp_path_factory.mktemp("defaults")
    status = main(["segment", *inputs, "-o", str(out), "--device", "cpu", "--quiet"])
    return status, out


def _labelmap(out: Path, name: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}_labels.nii.gz")))


def test_default_segment_uses_the_catalogue_defaults(default_run):
    status, out = default_run
    assert status == 0
    report = json.loads((out / f"{P001}.json").read_text())
    assert report["models"]["infection"]["id"] == catalogue.default_model_id("infection")
    assert report["models"]["lungs"]["id"] == catalogue.default_model_id("lungs")


def test_models_list_names_the_default_infection_model_with_version_and_licence():
    default = catalogue.default_model_id("infection")
    entry = next(r for r in _manifest()["models"] if r["id"] == default)    # a shipped model, not a built-in
    result = _cli("models", "list", manifest=SHIPPED_MANIFEST)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith(default + " "))
    assert lines[i].rstrip().endswith("(default)") and f"v{entry['version']}" in lines[i].split()
    assert entry["licence"] in lines[i + 1]
    assert sum(ln.rstrip().endswith("(default)") and " infection " in ln for ln in lines) == 1


def test_default_p001_slice_sensitivity_and_specificity(default_run):
    status, out = default_run
    assert status == 0
    labels = slice_labels(f"{P001}.nii.gz")
    assert labels["infected"].sum() == 80 and (~labels["infected"]).sum() > 0
    got = slice_agreement(_labelmap(out, P001)[labels["z"]] == LABEL_INFECTION, labels["infected"])
    assert got["sensitivity"] >= 0.90, got
    assert got["specificity"] >= 0.85, got
    # The infected area ranks infected slices above clean ones far better than chance.
    assert got["auc"] >= 0.85, got


def test_default_normal001_infected_share_near_zero(default_run):
    status, out = default_run
    assert status == 0
    labelmap = _labelmap(out, NORMAL)
    lung = int((labelmap > 0).sum())
    assert lung > 1_000_000  # the lungs were found (about 4 L at 0.63 x 0.63 x 2 mm)
    share = float((labelmap == LABEL_INFECTION).sum()) / lung
    assert share <= 0.002, f"{share:.4%} of the normal lungs segmented as infection"
    report = json.loads((out / f"{NORMAL}.json").read_text())
    assert report["quantification"] is not None


def test_evaluate_slice_labels_cli_gives_the_external_check(default_run, capsys):
    status, out = default_run
    assert status == 0
    csv_path = shared_file("ct/covidctmd_slice_labels.csv")
    assert main(["evaluate", "--pred", str(out / f"{P001}.seg.nrrd"), "--slice-labels", str(csv_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    labels = slice_labels(f"{P001}.nii.gz")
    direct = slice_agreement(_labelmap(out, P001)[labels["z"]] == LABEL_INFECTION, labels["infected"])
    assert result["file"] == P001 and result["n_infected_slices"] == 80
    assert result["slice"]["tp"] == direct["tp"] and result["slice"]["fp"] == direct["fp"]
    assert result["slice"]["auc"] == pytest.approx(direct["auc"], abs=1e-6)
    for side in ("right", "left"):  # the .seg.nrrd keeps the sides; the lobe columns give the truth
        got = result["sides"][side]
        assert got["tp"] + got["fn"] == int(labels[side].sum()) and got["tp"] + got["fp"] > 0
    report = json.loads((out / f"{P001}.json").read_text())
    both = report["quantification"]["both_lungs"]
    share = both["infection_voxels"] / both["voxels"]
    assert result["infected_share_of_lungs"] == pytest.approx(share, rel=0.01)


# ----------------------------------------------------------------------------------------------------------
# The manifest and `models verify`
# ----------------------------------------------------------------------------------------------------------

def test_manifest_lists_every_shipped_file_with_matching_size_and_checksum():
    manifest = _manifest()
    records = manifest["models"]
    files = {r["file"] for r in records if r.get("file")}
    on_disk = {p.name for p in MODELS_DIR.iterdir() if p.is_file() and p.name != "manifest.json"}
    assert files == on_disk
    total = 0
    for r in records:
        for key in ("id", "version", "task", "description", "sha256", "licence", "labels", "input",
                    "provenance", "metrics", "expected_seconds"):
            assert key in r, f"{r.get('id')}: manifest entry lacks {key!r}"
        if r.get("file"):
            path = MODELS_DIR / r["file"]
            assert path.stat().st_size == r["size_bytes"]
            assert file_sha256(path) == r["sha256"]
            total += r["size_bytes"]
        if "covid19ctseg" in json.dumps(r["provenance"]).lower():
            assert "non-commercial" in r["licence"].lower()  # CC BY-NC-SA data: say so
    assert total <= 25 * 1024 * 1024
    known = {e.model_id: e for e in catalogue.list_models()}
    for task, model_id in manifest.get("defaults", {}).items():
        assert model_id in known and known[model_id].task == task


def test_shipped_networks_load_with_the_manifest_spec():
    for r in _manifest()["models"]:
        if not r.get("file"):
            continue
        model = catalogue.load_model(r["id"], r["task"], device="cpu")
        assert model.info.model_id == r["id"]
        assert model.dims == r["input"]["dims"]
        assert list(model.slice_size) == r["input"]["slice_size"]
        assert model.intensity["name"] == r["input"]["intensity"]


def _cli(*args: str, manifest: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if manifest is not None:
        env["COVIDLESIONSEG_MANIFEST"] = str(manifest)
    return subprocess.run([sys.executable, "-m", "COVIDLesionSegLib.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_models_verify_accepts_the_shipped_files():
    result = _cli("models", "verify", manifest=SHIPPED_MANIFEST)
    assert result.returncode == 0, result.stdout + result.stderr
    for r in _manifest()["models"]:
        if r.get("file"):
            line = next(ln for ln in result.stdout.splitlines() if ln.startswith(r["id"] + " "))
            assert line.split()[-1] == "ok", line


def test_models_verify_detects_a_corrupted_copy(tmp_path):
    manifest = _manifest()
    shipped = [r for r in manifest["models"] if r.get("file")]
    if not shipped:
        pytest.skip("no weight files are shipped")
    for r in shipped:
        shutil.copyfile(MODELS_DIR / r["file"], tmp_path / r["file"])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    ok = _cli("models", "verify", manifest=tmp_path / "manifest.json")
    assert ok.returncode == 0, ok.stdout + ok.stderr

    victim = tmp_path / shipped[0]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of the weights
    victim.write_bytes(bytes(data))
    bad = _cli("models", "verify", manifest=tmp_path / "manifest.json")
    assert bad.returncode == 1
    line = next(ln for ln in bad.stdout.splitlines() if ln.startswith(shipped[0]["id"] + " "))
    assert "MISMATCH" in line and file_sha256(victim) in line

    victim.unlink()
    missing = _cli("models", "verify", manifest=tmp_path / "manifest.json")
    assert missing.returncode == 1
    assert any(ln.startswith(shipped[0]["id"] + " ") and "missing" in ln for ln in missing.stdout.splitlines())
