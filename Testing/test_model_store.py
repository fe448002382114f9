"""Model registry and cache: verified download (from a local file:// URL: no network in tests), import, resolve."""
from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from conftest import write_released_style_checkpoint
from UniversalSegLib import model_store as models
from UniversalSegLib.checkpoints import CheckpointError
from UniversalSegLib.model_store import ChecksumMismatch, ModelNotAvailable


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIVERSALSEG_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "models"


@pytest.fixture(scope="module")
def released_unet(tmp_path_factory):
    return write_released_style_checkpoint("unet", tmp_path_factory.mktemp("rel") / "clip_driven_universal_unet.pth")


def _with_spec(monkeypatch, name, **changes):
    monkeypatch.setitem(models.REGISTRY, name, replace(models.REGISTRY[name], **changes))


def test_registry_lists_official_models_not_installed(cache):
    listed = {spec.name: path for spec, path in models.list_models()}
    assert set(listed) == {"swinunetr", "unet"} and all(p is None for p in listed.values())
    for spec, _ in models.list_models():
        assert spec.url.startswith("https://") and "CC BY-NC-ND 4.0" in spec.license
    with pytest.raises(ModelNotAvailable, match="universalseg models download unet") as err:
        models.resolve_model("unet")
    assert "universalseg models import" in str(err.value)
    with pytest.raises(ModelNotAvailable, match="neither a known model"):
        models.resolve_model("no-such-model")


def test_download_verifies_sha256_and_installs(cache, released_unet, monkeypatch):
    sha = hashlib.sha256(released_unet.read_bytes()).hexdigest()
    _with_spec(monkeypatch, "unet", url=released_unet.as_uri(), sha256=sha)
    path = models.download_model("unet", progress=False)
    assert path == cache / "clip_driven_universal_unet.pth"
    assert path.read_bytes() == released_unet.read_bytes()
    assert models.resolve_model("unet") == path
    assert models._read_index()["unet"]["sha256"] == sha
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []


def test_download_with_wrong_checksum_leaves_nothing(cache, released_unet, monkeypatch):
    _with_spec(monkeypatch, "unet", url=released_unet.as_uri(), sha256="0" * 64)
    with pytest.raises(ChecksumMismatch, match="does not match the expected"):
        models.download_model("unet", progress=False)
    assert models.installed_path("unet") is None
    assert list(cache.iterdir()) == []


def test_md5_checked_when_sha256_not_yet_pinned(cache, released_unet, monkeypatch):
    _with_spec(monkeypatch, "unet", url=released_unet.as_uri(), sha256=None, md5="f" * 32)
    with pytest.raises(ChecksumMismatch, match="MD5"):
        models.download_model("unet", progress=False)
    md5 = hashlib.md5(released_unet.read_bytes()).hexdigest()
    _with_spec(monkeypatch, "unet", url=released_unet.as_uri(), sha256=None, md5=md5)
    models.download_model("unet", progress=False)
    # The SHA-256 seen at the first verified install is pinned for later checks.
    assert models._read_index()["unet"]["sha256"] == hashlib.sha256(released_unet.read_bytes()).hexdigest()


def test_unreachable_url_explains_offline_import(cache, tmp_path, monkeypatch):
    _with_spec(monkeypatch, "unet", url=(tmp_path / "missing.pth").as_uri())
    with pytest.raises(ModelNotAvailable, match="universalseg models import FILE"):
        models.download_model("unet", progress=False)


def test_import_local_file(cache, released_unet, monkeypatch):
    _with_spec(monkeypatch, "unet", sha256=hashlib.sha256(released_unet.read_bytes()).hexdigest())
    path = models.import_model(released_unet)  # the name is recognised from the official file name
    assert models.resolve_model("unet") == path
    with pytest.raises(FileExistsError, match="already installed"):
        models.import_model(released_unet)


def test_import_refuses_wrong_backbone(cache, released_unet, monkeypatch):
    _with_spec(monkeypatch, "swinunetr", sha256=hashlib.sha256(released_unet.read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match="wrong backbone"):
        models.import_model(released_unet, name="swinunetr")
    assert models.installed_path("swinunetr") is None
