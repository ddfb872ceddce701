"""Builds the Cython kernels in src/imgbackup/_core; everything else is in pyproject.toml."""

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

OPENMP = ["-fopenmp"]
COMMON = dict(
    include_dirs=[numpy.get_include()],
    extra_compile_args=["-O3", *OPENMP],
    extra_link_args=OPENMP,
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

extensions = [
    Extension("imgbackup._core.scan", ["src/imgbackup/_core/scan.pyx"], **COMMON),
    Extension("imgbackup._core.bitmap", ["src/imgbackup/_core/bitmap.pyx"], **COMMON),
    Extension("imgbackup._core.table", ["src/imgbackup/_core/table.pyx"], **COMMON),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )
)
