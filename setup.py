"""Build script: the Python package plus the optional C++ batch gatherer in csrc/."""
from setuptools import setup


def get_extensions() -> list:
    """The C++ extension arrives with the data issue; until then there is none."""
    return []


setup(ext_modules=get_extensions())
