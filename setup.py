"""jaxsr's one native piece: the fused CPU attention kernel (jaxsr/kernels/cpu_attention.cc).

It is an XLA FFI handler, not a Python module: it includes the FFI headers that jaxlib
ships (so jaxlib is a build requirement) and is loaded with ctypes at run time
(jaxsr/kernels/__init__.py). The build is optional: where no C++17 compiler is found,
the install goes on and attention runs as XLA ops (the "xla" backend), as it does on
accelerators.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildWithFFIHeaders(build_ext):
    def build_extensions(self):
        import jaxlib

        include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
        for ext in self.extensions:  # -isystem: the headers' own warnings are not ours
            ext.extra_compile_args = ["-isystem", include, *ext.extra_compile_args]
        super().build_extensions()


setup(
    ext_modules=[Extension(
        "jaxsr.kernels._cpu_attention",
        sources=["jaxsr/kernels/cpu_attention.cc"],
        language="c++",
        # No -march: x86-64 builds carry AVX-512, AVX2 and baseline clones of the hot
        # loop and pick one when loaded (target_clones in the source).
        extra_compile_args=["-O3", "-std=c++17", "-Wno-psabi"],
        optional=True,
    )],
    cmdclass={"build_ext": BuildWithFFIHeaders},
)
