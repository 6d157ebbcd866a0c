"""The README's plain-Python engine example runs as printed (on the phantom, saved under the file name the
example uses)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from COVIDLesionSegLib.phantom import make_chest_phantom
from Testing.conftest import REPO_ROOT, readme_python_blocks


def test_readme_plain_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = [b for b in readme_python_blocks() if "from COVIDLesionSegLib" in b]
    assert len(blocks) == 1, "the README should show exactly one plain-Python engine example"
    image, truth = make_chest_phantom()
    sitk.WriteImage(image, str(tmp_path / "chest_ct.nii.gz"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md (plain Python example)", "exec"), namespace)
    printed = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == namespace["result"].quantities["both_lungs"]["infected_percent"] and printed > 0
    labels = sitk.GetArrayFromImage(namespace["labels"])
    assert namespace["labels"].GetSize() == image.GetSize()
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    # The phantom's lungs are where the example's labelmap puts them (it is stored in LPS, identity direction).
    right = labels == 1
    dice = 2 * np.count_nonzero(right & (truth["right_lung"] > 0)) / (right.sum() + (truth["right_lung"] > 0).sum())
    assert dice > 0.85


def test_readme_export_example_writes_into_the_run_folder():
    """`training export` writes RUN/model.pt by default; the README's example must not put it elsewhere (it
    once wrote model.pt into the repository root) and must import the file it wrote."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    export = [line for line in text.splitlines() if "-m training export" in line]
    assert export and all(" -o " not in line for line in export), export
    run = export[0].split("-m training export", 1)[1].split()[0]
    assert f"models import {run}/model.pt" in text
