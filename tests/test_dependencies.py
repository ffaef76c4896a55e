"""Declared dependency floors are at least the versions whose APIs the code calls.

A floor below that installs fine and then fails at run time (on a user's older environment), so the
facts are written down here, where lowering a floor fails CI.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
NEEDED = {
    "torchvision": ("0.21", "cass.data.device_augment calls the v2 transforms' public make_params (0.21+)"),
    "pydicom": ("3.0", "cass.data.images imports pydicom.pixels (3.0+)"),
}


def declared_floor(package: str) -> Version:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for line in dependencies:
        requirement = Requirement(line)
        if requirement.name == package:
            floors = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
            assert floors, f"{package} has no lower bound in pyproject.toml"
            return max(floors)
    raise AssertionError(f"{package} is not a declared dependency")


@pytest.mark.parametrize("package", sorted(NEEDED))
def test_floor_covers_the_api_the_code_uses(package):
    needed, why = NEEDED[package]
    assert declared_floor(package) >= Version(needed), why


def test_the_apis_exist_in_the_installed_versions():
    from torchvision.transforms import v2

    assert hasattr(v2.RandomAffine(degrees=10), "make_params")
    import pydicom.pixels  # noqa: F401
