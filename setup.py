"""Build script: the Python package plus the optional C++ batch gatherer in csrc/."""
import os

from setuptools import setup


def get_extensions() -> list:
    """The row gatherer ``fastloop._C``: pybind11 only (no torch headers), so it builds under
    pip's default build isolation in seconds. Set FASTLOOP_NO_BUILD_EXT=1 to skip it."""
    if os.environ.get("FASTLOOP_NO_BUILD_EXT") == "1":
        return []
    from pybind11.setup_helpers import Pybind11Extension

    return [
        Pybind11Extension(
            "fastloop._C",
            sources=["csrc/gather.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ]


setup(ext_modules=get_extensions())
