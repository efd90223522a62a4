"""setuptools glue: build the native libraries, then the cffi module over them.

Everything that knows about llama.cpp lives in build_libllama.py; this file only
hooks it into ``build_ext`` so ``pip install .``, ``pip install -e .`` and
``python -m build`` all run the same steps and produce a platform wheel that
carries ``libllama``/``libggml*`` next to the extension (``$ORIGIN`` rpath).

With ``CYLLAMA_PORTABLE=1`` (scripts/build_portable_wheels.py) the wheel also carries
ggml's CPU backend variants, and on CPython it is one ``abi3`` wheel for every
version from 3.9 on: the C code cffi generates uses only the limited API.
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_libllama  # noqa: E402


class BuildLibllama(build_ext):
    """build_ext that first builds llama.cpp and emits the cffi C source."""

    def run(self) -> None:
        native = build_libllama.build_native()
        if self.inplace or getattr(self, "editable_mode", False):
            package_dir = Path(build_libllama.HERE) / "cyllama_cffi"
        else:
            package_dir = Path(self.build_lib) / "cyllama_cffi"
        build_libllama.copy_libraries(native, package_dir)
        ffibuilder = build_libllama.make_ffibuilder(native, link_dir=package_dir)
        temp = Path(self.build_temp)
        temp.mkdir(parents=True, exist_ok=True)
        c_file = temp / "_libllama.c"
        ffibuilder.emit_c_code(str(c_file))
        # The settings make_ffibuilder gave cffi's set_source, plus cffi's generated C file.
        settings = build_libllama.extension_settings(native, link_dir=package_dir)
        settings["sources"] = [str(c_file), *settings["sources"]]
        for extension in self.extensions:
            if extension.name == build_libllama.MODULE_NAME:
                for name, value in settings.items():
                    setattr(extension, name, list(value))
        super().run()

    def get_outputs(self):
        # Tell setuptools (editable installs, wheels) about the copied libraries too.
        outputs = super().get_outputs()
        package_dir = Path(self.build_lib) / "cyllama_cffi"
        return outputs + [str(p) for p in package_dir.glob("lib*.so*")]


# cffi's generated C defines Py_LIMITED_API itself; PyPy has no stable ABI to target.
LIMITED_API = build_libllama.portable() and sys.implementation.name == "cpython"

setup(
    ext_modules=[Extension(build_libllama.MODULE_NAME, sources=[], py_limited_api=LIMITED_API)],
    cmdclass={"build_ext": BuildLibllama},
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if LIMITED_API else {},
)
