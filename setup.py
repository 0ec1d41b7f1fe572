"""The compiled data path (pyvhost.datapath._native); everything else is in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and
pyvhost.datapath falls back to its pure-Python path (and says so in its log).
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(ext_modules=cythonize(
    [Extension("pyvhost.datapath._native", ["src/pyvhost/datapath/_native.pyx"],
               depends=["src/pyvhost/datapath/_switch.pxi"],
               extra_compile_args=["-O2"], optional=True)],
    compiler_directives={"language_level": "3"}))
