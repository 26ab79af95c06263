"""Packaging glue: all metadata is in pyproject.toml. This file only installs the source folders (trainer/, quant/,
tui/, presets/) under the `ft_desk` namespace, discovering every subpackage so a new room cannot be left out of
the wheel (tests/test_packaging.py builds the wheel and imports every module from it)."""

from setuptools import find_packages, setup

ROOTS = ("trainer", "quant", "tui", "presets")

setup(
    packages=[f"ft_desk.{name}" for name in find_packages(include=[f"{r}*" for r in ROOTS])],
    package_dir={f"ft_desk.{root}": root for root in ROOTS},
)
