"""The integrations' optional dependencies: pyproject.toml's extras are ``fastcl.integrations.EXTRAS``,
and an integration whose library is missing (simulated: ``sys.modules[name] = None`` blocks an import
as an absent package does) raises an ``ImportError`` naming the extra that installs it."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from fastcl import integrations
from fastcl.integrations import open_clip as open_clip_integration

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
ST_MODULES = ("fastcl.integrations.sentence_transformers", "fastcl.integrations._st_multi_vector")


def test_pyproject_declares_the_integrations_extras():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {k: declared.get(k) for k in integrations.EXTRAS} == integrations.EXTRAS


def test_the_extras_floors_are_those_tested_against():
    dev = (ROOT / "requirements" / "dev.txt").read_text().splitlines()
    for requirements in integrations.EXTRAS.values():
        for requirement in requirements:
            if not requirement.startswith("open_clip"):  # not installable here (its torchvision replaces torch)
                assert requirement in dev, f"{requirement} is not what requirements/dev.txt installs"


def _import_sentence_transformers_integration(monkeypatch):
    for name in ST_MODULES:  # imported afresh; monkeypatch puts the loaded modules back afterwards
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module(ST_MODULES[0])


def test_sentence_transformers_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError) as info:
        _import_sentence_transformers_integration(monkeypatch)
    message = str(info.value)
    assert "fastcl.integrations.sentence_transformers needs sentence-transformers>=6.3,<7" in message
    assert "which is not installed" in message
    assert 'pip install --no-build-isolation "fastcl[sentence-transformers]"' in message
    assert 'pip install --no-build-isolation ".[sentence-transformers]"' in message


def test_sentence_transformers_of_another_layout_names_the_extra(monkeypatch):
    pytest.importorskip("sentence_transformers")
    # what a 5.x install looks like to the integration: the module it needs is not there
    monkeypatch.setitem(sys.modules, "sentence_transformers.base.losses.merged_forward", None)
    with pytest.raises(ImportError) as info:
        _import_sentence_transformers_integration(monkeypatch)
    message = str(info.value)
    assert "importing it failed" in message and "merged_forward" in message
    assert "installed: sentence-transformers 6." in message
    assert '"fastcl[sentence-transformers]"' in message


def test_open_clip_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match=r'pip install --no-build-isolation "fastcl\[open-clip\]"'):
        open_clip_integration.install()
    assert not open_clip_integration.installed()


def test_fastcl_own_import_errors_pass_through():
    err = ImportError("cannot import name 'x' from 'fastcl.losses'", name="fastcl.losses")
    assert integrations.missing("fastcl.integrations.sentence_transformers", "sentence_transformers",
                                "sentence-transformers", err) is err


@pytest.mark.parametrize("module", ["fastcl.integrations.colpali", "fastcl.integrations.pylate"])
def test_late_interaction_integrations_need_no_library(monkeypatch, module):
    for name in ("colpali_engine", "pylate", "sentence_transformers"):
        monkeypatch.setitem(sys.modules, name, None)
    loaded = importlib.import_module(module)
    # imported afresh; monkeypatch puts back the module other tests hold (entry and package attribute)
    monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(integrations, module.rsplit(".", 1)[1], loaded)
    assert importlib.import_module(module) is not loaded
