"""Build mas-local: the Python package, the Triton kernels (as ``mas_local.kernels``)
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


ext_modules, cmdclass = _extensions()
packages = find_packages(include=["mas_local", "mas_local.*"])
package_dir = {"mas_local": "mas_local"}
if os.path.exists(os.path.join(HERE, "kernels", "__init__.py")):
    packages.append("mas_local.kernels")
    package_dir["mas_local.kernels"] = "kernels"

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
