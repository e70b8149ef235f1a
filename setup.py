"""Builds the C extension; every other piece of metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("mpc.hazmat._x25519", ["mpc/hazmat/_x25519.c"], extra_compile_args=["-O3"]),
    ]
)
