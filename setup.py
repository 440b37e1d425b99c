"""Builds kwconvert's optional compiled kernel; everything else is declared in pyproject.toml.

``kwconvert/methods/kernelwarehouse/_native.c`` is compiled once per instruction set, each copy its own module:
``_native_baseline`` with the compiler's default target (any CPU of the architecture) and, on
x86-64, ``_native_avx2`` (AVX2 + FMA + F16C) and ``_native_avx512`` (AVX-512F).  No copy is tied
to the CPU that built it (no flag asks for the build machine's own ISA): ``kwconvert.methods.kernelwarehouse.native`` loads, at run time,
the best copy the CPU executes (``KWCONVERT_ISA`` forces one).  Every copy is optional: when
the compiler is missing or refuses a flag, pip still installs kwconvert and the
pure-PyTorch paths (or the copies that did build) run.  OpenMP where the compiler has it
(not Apple's clang): without it the kernel runs on one thread.
"""
import platform
import sys

from setuptools import Extension, setup

PACKAGE = "kwconvert.methods.kernelwarehouse"
SOURCE = PACKAGE.replace(".", "/")
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
OPENMP = [] if sys.platform in ("darwin", "win32") else ["-fopenmp"]
#: module suffix -> the compiler flags of its instruction set
ISAS = {"baseline": [], **({"avx2": ["-mavx2", "-mfma", "-mf16c"], "avx512": ["-mavx512f", "-mavx2", "-mfma", "-mf16c"]}
                           if X86_64 and sys.platform != "win32" else {})}


def native_extension(isa: str, flags: list[str]) -> Extension:
    module = f"_native_{isa}"
    return Extension(f"{PACKAGE}.{module}", [f"{SOURCE}/_native.c"], depends=[f"{SOURCE}/_native_tile.h"],
                     define_macros=[("KW_MODULE", module)], extra_compile_args=["-O3", *flags, *OPENMP],
                     extra_link_args=OPENMP, optional=True)


setup(ext_modules=[native_extension(isa, flags) for isa, flags in ISAS.items()])
