"""Build mas-local: the Python package, the Triton kernels (``kernels/*.py`` into ``mas_local.kernels``)
and the optional compiled extension ``mas_local._C``.

The extension's C++ (CPU) kernels are built whenever ``csrc/*.cpp`` exist; the
CUDA kernels in ``csrc/cuda/*.cu`` are added when torch has CUDA and ``nvcc`` is
found. ``MAS_LOCAL_NO_EXT=1`` skips the extension: the package then falls back to
the torch reference with one logged notice.

The C++ standard is the one torch's extension builder picks for this torch (C++20
from torch 2.10, C++17 before). The CUDA targets are torch's usual choice:
``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0``; the GPU check sets it), else the GPUs
visible at build time. ``MAX_JOBS`` bounds the parallel compile jobs (ninja).
"""

import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("MAS_LOCAL_NO_EXT", "0") == "1":
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if not cpp:
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-fopenmp"]
    cu = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    use_cuda = bool(cu) and torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")
    )
    if use_cuda:
        ext = CUDAExtension(
            "mas_local._C",
            cpp + cu,
            extra_compile_args={
                "cxx": cxx + ["-DMAS_LOCAL_WITH_CUDA"],
                "nvcc": ["-O3"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("mas_local._C", cpp, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


class BuildPy(build_py):
    """Also copies the Triton sources of the top-level ``kernels/`` folder into ``mas_local/kernels/`` of the
    build (a wheel). An editable install needs no copy: ``mas_local.kernels`` takes in that folder itself. The
    folder has no ``__init__.py``, so that from the repository root ``import kernels`` finds no package
    (Hugging Face's hub-kernels package has that name)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "mas_local", "kernels")
        os.makedirs(target, exist_ok=True)
        for source in sorted(glob.glob(os.path.join(HERE, "kernels", "*.py"))):
            self.copy_file(source, os.path.join(target, os.path.basename(source)))


ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = BuildPy
packages = find_packages(include=["mas_local", "mas_local.*"])

setup(packages=packages, package_dir={"mas_local": "mas_local"}, ext_modules=ext_modules, cmdclass=cmdclass)
