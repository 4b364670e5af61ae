"""Equivalence with the official implementation on every fixture file in OPENDINO_FIXTURES."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import fixture_dirs, fixture_files
from tests.official_harness import check_file

pytestmark = pytest.mark.official


def _params():
    files = fixture_files()
    if not files:
        return [pytest.param(None, id="no-fixtures")]
    return [pytest.param(path, id=f"{path.parent.name}/{path.name}") for path in files]


@pytest.mark.parametrize("path", _params())
def test_fixture(path):
    assert path is not None, f"no *.pt fixture files in {':'.join(map(str, fixture_dirs()))}"
    check_file(path)


def test_unknown_kind_is_a_failure(tmp_path):
    torch.save({"kind": "vit_9000"}, tmp_path / "f.pt")
    with pytest.raises(AssertionError, match="no checker for kind 'vit_9000'"):
        check_file(tmp_path / "f.pt")


def test_harness_detects_a_small_deviation(tmp_path):
    source = next((f for f in fixture_files() if f.name == "fixture_vit_tiny.pt"), None)
    if source is None:
        pytest.skip("fixture_vit_tiny.pt not available")
    data = torch.load(source, weights_only=True)
    data["outputs"]["x64"]["forward"] = data["outputs"]["x64"]["forward"] + 5e-5
    torch.save(data, tmp_path / "perturbed.pt")
    with pytest.raises(AssertionError, match="outputs.x64.forward"):
        check_file(tmp_path / "perturbed.pt")
