"""Builds kwconvert's optional compiled kernel; everything else is declared in pyproject.toml.

``kwconvert/_native.c`` is compiled for this machine (``-march=native``) with OpenMP.  The
extension is optional: when the compiler is missing or refuses the flags, pip still installs
kwconvert, ``kwconvert.native.available()`` is False and the pure-PyTorch paths run.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("kwconvert._native", ["kwconvert/_native.c"],
                             extra_compile_args=["-O3", "-march=native", "-fopenmp"],
                             extra_link_args=["-fopenmp"], optional=True)])
