"""The wheel installs one package, ``embplex``, with every config file and plugin.

The source tree keeps ``core/``, ``plugins/`` and ``conf/`` at the top; the wheel must map
them under ``embplex`` (a wheel installing a top-level ``core`` or ``conf`` would collide
with other projects), ship every Hydra config file, and declare one entry point per
plugin module. The wheel is built once per module from a copy of the source, so the build
leaves nothing behind in the repository.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
KINDS = ("backbone", "attention", "pooling", "loss", "sampler", "index")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    source = tmp_path_factory.mktemp("source")
    for path in REPO.iterdir():
        if path.is_file() and not path.name.startswith("."):
            shutil.copy2(path, source / path.name)
    for folder in ("core", "plugins", "conf"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with the venv's setuptools, no network. The dependency check
    # is skipped because setuptools >= 70.1 builds wheels without the `wheel` package.
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
         "--outdir", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"building the wheel failed:\n{done.stdout}\n{done.stderr}"
    (built,) = out.glob("embplex-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def _dist_info(wheel: zipfile.ZipFile) -> str:
    (name,) = {n.split("/")[0] for n in wheel.namelist() if n.split("/")[0].endswith(".dist-info")}
    return name


def test_everything_installs_under_embplex(wheel):
    dist_info = _dist_info(wheel)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert dist_info == f"embplex-{version}.dist-info"
    stray = [n for n in wheel.namelist() if not n.startswith(("embplex/", f"{dist_info}/"))]
    assert stray == [], f"files outside the embplex package: {stray}"
    top_level = {n.split("/")[0] for n in wheel.namelist()}
    assert not top_level & {"core", "plugins", "conf", "tests", "docs"}
    assert wheel.read(f"{dist_info}/top_level.txt").decode().split() == ["embplex"]


def test_core_modules_are_the_embplex_package(wheel):
    names = set(wheel.namelist())
    for module in sorted((REPO / "core").rglob("*.py")):
        inside = module.relative_to(REPO / "core").as_posix()
        assert f"embplex/{inside}" in names, f"core/{inside} is missing from the wheel"


def test_every_config_file_is_shipped(wheel):
    configs = sorted(p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml"))
    assert "embplex.yaml" in configs
    missing = [c for c in configs if f"embplex/conf/{c}" not in wheel.namelist()]
    assert missing == [], f"config files left out of the wheel (package-data in pyproject.toml): {missing}"


def test_every_plugin_module_is_shipped_with_an_entry_point(wheel):
    dist_info = _dist_info(wheel)
    entry_points = configparser.ConfigParser(delimiters=("=",))
    entry_points.optionxform = str  # keep names as written
    entry_points.read_string(wheel.read(f"{dist_info}/entry_points.txt").decode())

    declared = dict(entry_points["embplex"])
    modules = {
        f"{kind}.{path.stem}": f"embplex.plugins.{kind}.{path.stem}"
        for kind in KINDS
        for path in (REPO / "plugins" / kind).glob("*.py")
        if path.stem != "__init__"
    }
    assert modules, "no plugin modules found under plugins/"
    missing = sorted(set(modules) - set(declared))
    assert missing == [], f"plugin modules without an entry point in pyproject.toml: {missing}"
    assert declared == modules, "every entry point must be `<kind>.<name> = embplex.plugins.<kind>.<name>`"
    for module in modules.values():
        assert module.replace(".", "/") + ".py" in wheel.namelist()


def test_console_script_is_declared(wheel):
    text = wheel.read(f"{_dist_info(wheel)}/entry_points.txt").decode()
    assert "[console_scripts]" in text
    assert "embplex = embplex.cli:main" in text
