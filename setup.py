"""Package layout: one namespace, ``kensa``, over the top-level folders the project is known by.

The folders keep their names (``models/``, ``flows/``, ...) but install as ``kensa.models``,
``kensa.flows``, ...; nothing named ``models`` or ``flows`` lands in site-packages. Subpackages are
found here, so a new one needs no edit. Everything else is in ``pyproject.toml``.
"""

from setuptools import find_packages, setup

# Import name -> folder. `kensa` itself (settings, store, CLI, notebook API) is its own folder.
PARTS = {
    "kensa.models": "models",
    "kensa.monitoring": "monitoring",
    "kensa.flows": "flows",
    "kensa.governance": "governance",
    "kensa.serving": "serving",
}

packages = find_packages(include=["kensa", "kensa.*"])
for name, folder in PARTS.items():
    packages += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]

setup(packages=packages, package_dir={"kensa": "kensa", **PARTS})
