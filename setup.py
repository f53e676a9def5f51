"""Packages of the one import namespace ``hf_memory``: the repository keeps architectures in ``modeling/`` and
converters in ``conversion/``; each folder (and every sub-package found in it) is installed inside
``hf_memory``. Metadata lives in pyproject.toml."""

from setuptools import find_packages, setup

FOLDERS = {"hf_memory": "hf_memory", "hf_memory.modeling": "modeling", "hf_memory.conversion": "conversion"}

package_dir, packages = {}, []
for package, folder in FOLDERS.items():
    package_dir[package] = folder
    packages += [package] + [f"{package}.{sub}" for sub in find_packages(folder)]

setup(package_dir=package_dir, packages=sorted(set(packages)))
