"""The model catalogue: download on request (file:// URLs the tests create stand in for the web), offline
errors, checksum checks, and importing a checkpoint from a file."""

from __future__ import annotations

import pytest

from COVIDLesionSegLib import catalogue
from COVIDLesionSegLib.cli import main
from COVIDLesionSegLib.errors import ModelError
from COVIDLesionSegLib.models.checkpoint import file_sha256
from Testing.engine.helpers import _checkpoint, _linear


@pytest.fixture(scope="module", autouse=True)
def _archs(test_archs):
    """Every test here runs with the test-only architectures registered (Testing/conftest.py)."""


def test_a_url_model_is_not_fetched_until_asked(remote_model):
    served, record = remote_model
    entry = catalogue.get_entry("big-variant")
    assert not entry.available and entry.url == record["url"]
    with pytest.raises(ModelError, match="models download big-variant"):
        catalogue.load_model("big-variant", "infection", device="cpu")
    statuses = {e.model_id: s for e, s in catalogue.verify_models()}
    assert statuses["big-variant"] == "not downloaded"


def test_download_fetches_checks_and_caches(remote_model, capsys):
    served, record = remote_model
    assert main(["models", "download", "big-variant"]) == 0
    entry = catalogue.get_entry("big-variant")
    assert entry.available and file_sha256(entry.path) == record["sha256"]
    assert entry.path.parent.name == "cache"
    model = catalogue.load_model("big-variant", "infection", device="cpu")
    assert model.info.model_id == "big-variant"
    mtime = entry.path.stat().st_mtime_ns
    catalogue.download_model("big-variant")             # a verified copy is kept, not fetched again
    assert entry.path.stat().st_mtime_ns == mtime


def test_offline_download_says_how_to_import(remote_model, capsys):
    served, record = remote_model
    served.unlink()                                      # the URL no longer answers, as offline
    assert main(["models", "download", "big-variant"]) == 1
    err = capsys.readouterr().err
    assert "could not download model 'big-variant'" in err and "models import FILE" in err
    assert not catalogue.get_entry("big-variant").available
    assert not catalogue.cache_dir().exists() or not any(catalogue.cache_dir().iterdir())  # no partial file


def test_corrupted_download_is_refused_and_leaves_nothing(remote_model, tmp_path):
    served, record = remote_model
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0x01
    served.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupted or not the listed file"):
        catalogue.download_model("big-variant")
    entry = catalogue.get_entry("big-variant")
    assert not entry.path.exists() and not list(entry.path.parent.glob("*.tmp*"))


def test_import_of_a_url_model_goes_where_the_catalogue_looks(remote_model, tmp_path):
    served, record = remote_model
    copy = tmp_path / "downloaded elsewhere.pt"
    copy.write_bytes(served.read_bytes())
    assert main(["models", "import", str(copy)]) == 0
    assert catalogue.get_entry("big-variant").available
    # a file that claims the id but is not the listed file is refused
    other = _checkpoint(tmp_path, "test-pred-linear3d", _linear(3), 3, name="big-variant")
    with pytest.raises(ModelError, match="is not the listed"):
        catalogue.import_model(other, overwrite=True)


def test_two_exported_runs_named_model_pt_import_side_by_side(remote_model, tmp_path):
    paths = []
    for name in ("run-a", "run-b"):
        (tmp_path / name).mkdir()
        path = _checkpoint(tmp_path / name, "test-pred-linear2d", _linear(2), 2, name=name)
        paths.append(path.rename(path.with_name("model.pt")))
    entries = [catalogue.import_model(p) for p in paths]
    assert [e.model_id for e in entries] == ["run-a", "run-b"]
    assert entries[0].path != entries[1].path and all(e.path.is_file() for e in entries)
    with pytest.raises(ModelError, match="already exists"):
        catalogue.import_model(paths[0])
    with pytest.raises(ModelError, match="has no download URL"):
        catalogue.download_model("hu-threshold")
