"""Only the library installs: `pip install .` puts `ttt` (and its subpackages) into site-packages,
never the repository's `experiments/` or `tests/`, whose top-level names would collide with any
other project's."""

import configparser
import pathlib

import setuptools

REPO = pathlib.Path(__file__).resolve().parents[1]


def _installed_packages() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    include = [p.strip() for p in cfg["options.packages.find"]["include"].split(",")]
    return setuptools.find_packages(where=str(REPO), include=include)


def test_only_the_ttt_package_installs():
    packages = _installed_packages()
    assert "ttt" in packages and "ttt.ops.kernels" in packages, packages
    assert all(p == "ttt" or p.startswith("ttt.") for p in packages), packages
    on_disk = {p.parent.name for p in (REPO / "ttt").rglob("__init__.py")}
    assert {p.split(".")[-1] for p in packages} == on_disk  # every subpackage is included


def test_the_find_pattern_would_catch_a_stray_package():
    """Negative control: the old pattern (`ttt*, experiments*`) installs experiments."""
    found = setuptools.find_packages(where=str(REPO), include=["ttt*", "experiments*"])
    assert "experiments" in found
