"""Equivalence with the official implementation on every fixture file in OPENDINO_FIXTURES."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import fixture_dirs, fixture_files
from tests.official_harness import CHECKERS, PENDING_KINDS

pytestmark = pytest.mark.official


def _params():
    files = fixture_files()
    if not files:
        return [pytest.param(None, id="no-fixtures")]
    params = []
    for path in files:
        kind = torch.load(path, weights_only=True, map_location="cpu").get("kind")
        marks = []
        if kind in PENDING_KINDS:
            marks.append(pytest.mark.xfail(reason=f"kind {kind!r} lands with {PENDING_KINDS[kind]}", strict=True))
        params.append(pytest.param(path, id=f"{path.parent.name}/{path.name}", marks=marks))
    return params


@pytest.mark.parametrize("path", _params())
def test_fixture(path):
    assert path is not None, f"no *.pt fixture files in {':'.join(map(str, fixture_dirs()))}"
    data = torch.load(path, weights_only=True, map_location="cpu")
    kind = data.get("kind")
    assert kind in CHECKERS, f"{path.name}: no checker for kind {kind!r}; known: {sorted(CHECKERS)}"
    CHECKERS[kind](data)
