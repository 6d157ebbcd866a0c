"""The memory check before a scan is read (``memory.py``): a scan that cannot fit the free memory is refused as
its own case's failure, with what it needs, and the batch goes on; without the check, the kernel kills the
process (a real container memory limit, cgroup v1, where this machine allows one)."""

from __future__ import annotations

import csv
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib import io, memory
from COVIDLesionSegLib.errors import user_message

from .faults import cli_command, memory_cgroup, write_phantom
from .helpers import _write_dicom_series

MiB = 1024 ** 2


def write_cylinder_chest(path, slices: int) -> None:
    """A chest-like CT of 512 x 512 x ``slices`` voxels (body, two lungs, air around), uncompressed: large to
    read, valid for every input check."""
    yy, xx = np.mgrid[:512, :512]
    plane = np.full((512, 512), -1000, np.int16)
    plane[((yy - 256) / 200.0) ** 2 + ((xx - 256) / 240.0) ** 2 <= 1] = 40
    for cx in (160, 352):
        plane[((yy - 250) / 140.0) ** 2 + ((xx - cx) / 70.0) ** 2 <= 1] = -850
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.broadcast_to(plane, (slices, 512, 512))))
    image.SetSpacing((0.7, 0.7, 0.8))
    sitk.WriteImage(image, str(path), useCompression=False)


def test_a_scan_that_cannot_fit_is_refused_from_its_header_before_its_pixels_are_read(tmp_path, monkeypatch):
    # The header claims 512 x 512 x 600 voxels; the data file does not exist, so any read of the pixels would
    # fail differently: the refusal comes from the header alone.
    header = tmp_path / "thin.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 512 512 600\nElementType = MET_SHORT\n"
                      "ElementSpacing = 0.7 0.7 0.5\nElementDataFile = thin.raw\n")
    needed = memory.minimum_bytes(512 * 512 * 600)
    assert needed == 200 * MiB + 3 * 512 * 512 * 600
    monkeypatch.setattr(memory, "available_bytes", lambda: needed - 1)
    with pytest.raises(memory.InsufficientMemoryError) as refused:
        io.read_image(header)
    message = user_message(refused.value)
    assert message.kind == "out_of_memory" and message.title == "Out of memory"
    assert "157 million voxels" in message.text and "needs at least 0.6 GB" in message.text
    assert f"about {memory.typical_bytes(512 * 512 * 600) / 1024 ** 3:.1f} GB" in message.text
    assert "crop the scan" in message.text
    # With just enough free, the check passes and the missing data file is what fails.
    monkeypatch.setattr(memory, "available_bytes", lambda: needed)
    with pytest.raises(Exception) as other:
        io.read_image(header)
    assert not isinstance(other.value, memory.InsufficientMemoryError)
    # The check can be turned off for a machine whose figures mislead.
    monkeypatch.setattr(memory, "available_bytes", lambda: 0)
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    with pytest.raises(Exception) as skipped:
        io.read_image(header)
    assert not isinstance(skipped.value, memory.InsufficientMemoryError)


def test_a_dicom_series_is_checked_from_its_first_slice_and_its_file_count(tmp_path, monkeypatch):
    series = np.full((12, 96, 80), -1000, np.int16)
    _write_dicom_series(tmp_path / "series", series, (0.8, 0.8, 2.5), "1.2.3.4.900")
    needed = memory.minimum_bytes(12 * 96 * 80)
    monkeypatch.setattr(memory, "available_bytes", lambda: needed - 1)
    with pytest.raises(memory.InsufficientMemoryError, match=r"\(80, 96, 12\) needs at least"):
        io.read_input(tmp_path / "series")
    monkeypatch.setattr(memory, "available_bytes", lambda: needed)
    image, _notes, _dicom = io.read_input(tmp_path / "series")
    assert image.GetSize() == (80, 96, 12)


def test_free_memory_is_the_machines_and_the_containers_least(tmp_path):
    available = memory.available_bytes()
    if available is not None:                      # Linux: MemAvailable + SwapFree, within what the machine has
        total = sum(memory._read_fields(memory._MEMINFO, scale=1024).get(k, 0) for k in ("MemTotal", "SwapTotal"))
        assert 0 < available <= total
    # cgroup v1: the own cgroup's limit (or an ancestor's, hierarchical_memory_limit) less usage without the
    # reclaimable page cache.
    v1 = tmp_path / "v1"
    node = v1 / "memory" / "docker" / "abc"
    node.mkdir(parents=True)
    (node / "memory.limit_in_bytes").write_text("4294967296\n")
    (node / "memory.usage_in_bytes").write_text("3221225472\n")
    (node / "memory.stat").write_text("cache 5\nhierarchical_memory_limit 4294967296\ntotal_inactive_file 1073741824\n")
    membership = tmp_path / "cgroup_v1"
    membership.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert memory._cgroup_headroom(v1, membership) == 4294967296 - (3221225472 - 1073741824)
    (node / "memory.stat").write_text("hierarchical_memory_limit 2147483648\ntotal_inactive_file 0\n")
    assert memory._cgroup_headroom(v1, membership) == 0            # the parent's 2 GB are used up
    (node / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (node / "memory.stat").write_text("hierarchical_memory_limit 9223372036854771712\n")
    assert memory._cgroup_headroom(v1, membership) is None         # v1's "no limit"
    # cgroup v2: the tightest of the own cgroup and its ancestors; "max" is no limit.
    v2 = tmp_path / "v2"
    leaf = v2 / "user.slice" / "job"
    leaf.mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("memory\n")
    (leaf / "memory.max").write_text("max\n")
    (leaf / "memory.current").write_text("100\n")
    (leaf.parent / "memory.max").write_text("8000\n")
    (leaf.parent / "memory.current").write_text("7000\n")
    (leaf.parent / "memory.stat").write_text("anon 5000\ninactive_file 2500\n")
    membership.write_text("0::/user.slice/job\n")
    assert memory._cgroup_headroom(v2, membership) == 8000 - (7000 - 2500)
    membership.write_text("0::/elsewhere\n")                        # own cgroup not visible: the mount's root
    assert memory._cgroup_headroom(v2, membership) is None
    assert memory._cgroup_headroom(v2, tmp_path / "missing") is None


def test_a_scan_beyond_a_containers_memory_limit_is_refused_and_the_batch_goes_on(tmp_path):
    # 512 x 512 x 400 (105 M voxels): at least 0.5 GB; the container allows 450 MiB, enough for the small case.
    limit = 450 * MiB
    assert memory.minimum_bytes(512 * 512 * 400) > limit
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_cylinder_chest(inputs / "a_large.nii", 400)
    write_phantom(inputs / "b_small.nii.gz")
    with memory_cgroup(limit) as enter:
        if enter is None:
            pytest.skip("cannot make a cgroup v1 memory limit here (needs root and the v1 memory hierarchy)")

        def run(out, *env):
            command = ["env", *env, *cli_command("segment", str(inputs), "-o", str(out), "--quiet",
                                                 "--lungs-only")]
            return subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=enter)

        # The fault is real: without the check the kernel kills the process in the large case, so the case
        # after it never runs.
        unchecked = run(tmp_path / "unchecked", f"{memory.SKIP_ENV}=1")
        assert unchecked.returncode in (-9, 137), (unchecked.returncode, unchecked.stderr[-2000:])
        assert not (tmp_path / "unchecked" / "b_small.json").exists()
        checked = run(tmp_path / "checked")
    assert checked.returncode == 1, checked.stderr[-2000:]
    large = inputs / "a_large.nii"
    assert f"  {large}: this scan of 105 million voxels" in checked.stderr
    assert f"{large}: {large}" not in checked.stderr          # the failure list says the path once
    assert "of memory to be segmented" in checked.stderr
    rows = {r["case"]: r for r in csv.DictReader((tmp_path / "checked" / "results.csv").open())}
    assert rows["a_large"]["status"] == "failed" and "needs at least" in rows["a_large"]["error"]
    assert rows["b_small"]["status"] == "ok"
    assert (tmp_path / "checked" / "b_small.seg.nrrd").is_file()
