"""The web session's files without a browser or trame: size limits, no overwriting, zipped DICOM, the data folder,
the same checks and messages as the command line, and the ``serve`` command's refusal without the web extra."""

from __future__ import annotations

import zipfile

import pytest
import SimpleITK as sitk

from COVIDLesionSegLib import phantom
from COVIDLesionSegLib.errors import InputError
from COVIDLesionSegLib.web.session import UploadTooLarge, WebSession


@pytest.fixture
def session(tmp_path):
    s = WebSession(tmp_path / "data", max_upload_mb=1, root=tmp_path / "sessions")
    yield s
    s.close()


def test_uploads_never_overwrite_and_the_folder_goes_with_the_session(tmp_path):
    session = WebSession(root=tmp_path)
    first = session.receive("ct.nii.gz", [b"one"])
    second = session.receive("ct.nii.gz", [b"two"])
    assert first != second and first.read_bytes() == b"one" and second.read_bytes() == b"two"
    assert first.is_relative_to(session.folder) and second.is_relative_to(session.folder)
    session.close()
    assert not session.folder.exists()


def test_an_upload_over_the_limit_is_refused_and_removed(session):
    with pytest.raises(UploadTooLarge, match="larger than this server's limit of 1 MB"):
        session.receive("big.nrrd", [b"x" * 600_000, b"x" * 600_000])
    assert not any(session.uploads.rglob("big.nrrd"))


def test_names_from_the_browser_cannot_leave_the_session_folder(session):
    path = session.receive("../../etc/evil.nii", [b"x"])
    assert path.is_relative_to(session.uploads) and path.name == "evil.nii"
    with pytest.raises(InputError, match="not a file the segmentation can read"):
        session.receive("notes.txt", [b"x"])


def test_a_zip_expands_flat_inside_the_upload_folder_and_is_size_limited(session, tmp_path):
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../../outside.dcm", b"a")
        z.writestr("study/series/IM0001", b"b")
    upload = session.receive("series.zip", [archive.read_bytes()])
    folder = session.prepare(upload)
    assert folder.is_relative_to(upload.parent) and len(list(folder.iterdir())) == 2
    assert not (tmp_path / "outside.dcm").exists()

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.dcm", b"\0" * 3_000_000)       # 3 MB that compress to a few kB
    with pytest.raises(UploadTooLarge, match="its contents are larger"):
        session.prepare(session.receive("bomb.zip", [bomb.read_bytes()]))
    with pytest.raises(InputError, match="not a readable zip archive"):
        session.prepare(session.receive("fake.zip", [b"not a zip"]))


def test_the_data_folder_lists_cases_and_nothing_else(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    image, _ = phantom.make_chest_phantom(shape_zyx=(16, 32, 32))
    sitk.WriteImage(image, str(data / "a.nii.gz"))
    (data / "readme.txt").write_text("not a case")
    session = WebSession(data, root=tmp_path / "s")
    try:
        assert session.data_choices() == ["a.nii.gz"]
        assert session.data_path("a.nii.gz") == data / "a.nii.gz"
        with pytest.raises(InputError, match="not one of the cases"):
            session.data_path("../a.nii.gz")
    finally:
        session.close()


def test_loading_refuses_what_the_command_line_refuses_with_its_message(session, tmp_path):
    """An 8-bit windowed image: the page gets the refusal ``covidlesionseg segment`` prints."""
    from COVIDLesionSegLib.checks import load_volume
    from COVIDLesionSegLib.worker import classify_error

    image, _ = phantom.make_chest_phantom(shape_zyx=(16, 80, 80))
    windowed = sitk.Cast(sitk.IntensityWindowing(image, -1350, 150, 0, 255), sitk.sitkUInt8)
    path = tmp_path / "windowed.nii.gz"
    sitk.WriteImage(windowed, str(path))
    upload = session.receive(path.name, [path.read_bytes()])
    with pytest.raises(InputError) as refused:
        session.load(session.prepare(upload))
    with pytest.raises(InputError) as cli:
        load_volume(path)
    assert classify_error(refused.value)[1].replace(str(upload), str(path)) == classify_error(cli.value)[1]
    assert "0-255" in str(refused.value) or "windowed" in str(refused.value)


def test_serve_without_the_web_extra_says_what_to_install(monkeypatch, capsys):
    from COVIDLesionSegLib import cli, web

    monkeypatch.setattr(web, "missing_dependency", lambda: f"trame_slicer is not installed; {web.WEB_EXTRA_HINT}")
    assert cli.main(["serve", "--port", "0"]) == 1
    assert 'pip install -e ".[web]"' in capsys.readouterr().err
