"""Build script: the Python package plus the optional C++ extensions in csrc/ (batch gatherer, LSTM loop)."""
import os

from setuptools import setup


def get_extensions() -> list:
    """The row gatherer ``fastloop._C`` and the LSTM time loop ``fastloop._lstm``: pybind11 only
    (no torch headers), so they build under pip's default build isolation in seconds. Set
    FASTLOOP_NO_BUILD_EXT=1 to skip them."""
    if os.environ.get("FASTLOOP_NO_BUILD_EXT") == "1":
        return []
    from pybind11.setup_helpers import Pybind11Extension

    return [
        Pybind11Extension(
            "fastloop._C",
            sources=["csrc/gather.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        ),
        Pybind11Extension(
            "fastloop._lstm",
            sources=["csrc/lstm.cpp"],
            cxx_std=17,
            # -fno-trapping-math lets GCC vectorize the clamps of exp (selects, NaN still passes)
            extra_compile_args=["-O3", "-fno-trapping-math"],
        ),
    ]


setup(ext_modules=get_extensions())
