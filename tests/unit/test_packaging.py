"""The built wheel installs one namespace, ``kensa``: no ``models`` or ``flows`` in site-packages."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the build backend (setuptools) is already in this environment, and a
    # test must not reach a package index.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("kensa-*.whl")
    return path


@pytest.fixture(scope="module")
def fresh_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with only the wheel installed; its dependencies (torch, MLflow,
    Prefect, ...) are borrowed read-only from this environment's site-packages through a plain
    path entry, which adds the folder but runs none of its .pth files (so this checkout's editable
    install stays invisible there)."""
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    fresh_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(fresh_site, "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    return python


def _run(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=cwd, check=False)


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    names = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert names == {"kensa", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    files = set(zipfile.ZipFile(wheel).namelist())
    # The folders map into the namespace, data files included.
    for needed in (
        "kensa/models/nets/zoo.py",
        "kensa/flows/pilot.py",
        "kensa/governance/bundle.py",
        "kensa/serving/console/templates/base.html",
        "kensa/monitoring/drift.py",
        "kensa/store/migrations/env.py",
    ):
        assert needed in files


def test_installed_wheel_imports_as_kensa_only(fresh_python: Path, tmp_path: Path) -> None:
    # Run outside the checkout, so its folders are not on sys.path.
    for name in ("models", "flows", "serving", "monitoring", "governance"):
        r = _run(fresh_python, f"import {name}", tmp_path)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, name
    r = _run(
        fresh_python,
        "import kensa.models.nets.zoo, kensa.flows.config, kensa.serving.app, kensa.governance.bundle;"
        "print(kensa.models.nets.zoo.__file__)",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "site-packages/kensa/models/nets/zoo.py" in r.stdout


def test_the_notebook_api_does_not_import_prefect(fresh_python: Path, tmp_path: Path) -> None:
    r = _run(
        fresh_python,
        "import sys, kensa; kensa.open_dataset; kensa.log_experiment;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
