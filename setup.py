"""Build of the fastvq Python extension (fastvq._C).

setup.py owns the Python extension; CMakeLists.txt owns the torch-free native parts (kernel cores,
native tests). Neither keeps a source list: both glob csrc/.

Build switches (environment variables, read here and only here; see docs/dev.md):
  FASTVQ_NO_CUDA=1        build the CPU-only extension even when CUDA is available
  FASTVQ_REQUIRE_CUDA=1   fail instead of falling back to a CPU-only build (CI sets this)
  FASTVQ_DEBUG=1          -O0 -g, assertions on
  FASTVQ_EMU=1            also build fastvq._C_emu: every .cu compiled by g++ against csrc/cuda_emu/, its
                          launchers registered as torch.ops.fastvq_emu.* CPU kernels (tests run the CUDA
                          kernels' source on the CPU through it)
  FASTVQ_EMU_ASAN=1       also build fastvq._C_emu_asan: the same under AddressSanitizer + UBSan
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0+PTX": there is no GPU to detect)
  MAX_JOBS                parallel compile jobs (ninja); ccache is used automatically when on PATH
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def cuda_decision():
    """(use_cuda, reason) from the switches, torch's build and CUDA_HOME."""
    import torch
    from torch.utils import cpp_extension

    if env_flag("FASTVQ_NO_CUDA"):
        return False, "FASTVQ_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return False, f"nvcc not found under CUDA_HOME={home!r} (set CUDA_HOME=/usr/local/cuda)"
    return True, f"torch CUDA {torch.version.cuda}, nvcc at {home}/bin/nvcc"


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def make_extensions():
    from torch.utils import cpp_extension

    use_cuda, reason = cuda_decision()
    if not use_cuda and env_flag("FASTVQ_REQUIRE_CUDA"):
        sys.exit(f"fastvq: FASTVQ_REQUIRE_CUDA=1 but CUDA kernels cannot be built: {reason}")
    print(f"fastvq: {'CUDA' if use_cuda else 'CPU-only'} build ({reason})", file=sys.stderr)
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    # Every .cpp under csrc/ but the native tests (CMake builds those); every .cu when CUDA is on.
    # (csrc/emu/ belongs to the emulation build below.)
    sources = [s for s in rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
               if not s.startswith((os.path.join("csrc", "tests") + os.sep, os.path.join("csrc", "emu") + os.sep))]
    if use_cuda:
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))

    debug = env_flag("FASTVQ_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    defines = [f'-DFASTVQ_VERSION="{VERSION}"']
    if use_cuda:
        defines.append("-DFASTVQ_WITH_CUDA")
    cxx = opt + defines + ["-fopenmp", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    nvcc = opt + defines + ["-lineinfo", "--expt-relaxed-constexpr", "--fmad=false", "-Xcompiler", "-fopenmp"]
    # nvcc reads these itself; --use_fast_math defines no macro that csrc/common/macros.h could refuse.
    for var in ("NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS"):
        if any(f in os.environ.get(var, "") for f in ("use_fast_math", "ftz=true", "prec-div=false",
                                                       "prec-sqrt=false", "fmad=true")):
            raise SystemExit(f"fastvq: {var}={os.environ[var]!r} asks nvcc for fast math; fastvq's kernels promise "
                             "IEEE results bit-identical across backends (docs/conventions.md)")
    ext_cls = cpp_extension.CUDAExtension if use_cuda else cpp_extension.CppExtension
    return [ext_cls(
        name="fastvq._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if use_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )]


def write_if_changed(path: str, text: str) -> None:
    """Leave an unchanged file alone, so ninja does not rebuild it."""
    if os.path.exists(path) and open(path).read() == text:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


EMU_SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]


def make_emu_extensions():
    """The CUDA emulation build (docs/cuda_emu.md): every csrc/**/*.cu and csrc/emu/*.cpp compiled by the
    host compiler into a plain shared library that `fastvq.emu.load()` loads with torch.ops.load_library.
    Each variant compiles its own generated one-line wrappers (build/emu_src/<variant>/), so the two
    variants' object files never collide."""
    from torch.utils import cpp_extension

    variants = []
    if env_flag("FASTVQ_EMU"):
        variants.append(("_C_emu", []))
    if env_flag("FASTVQ_EMU_ASAN"):
        variants.append(("_C_emu_asan", EMU_SANITIZE))
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    csrc = os.path.join(ROOT, "csrc")
    originals = (rel(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
                 + rel(glob.glob(os.path.join(csrc, "emu", "*.cpp"))))
    exts = []
    for name, sanitize in variants:
        sources = []
        for src in originals:
            inner = os.path.relpath(os.path.join(ROOT, src), csrc)
            wrapper = os.path.join(ROOT, "build", "emu_src", name, inner.replace(os.sep, "__") + ".cpp")
            write_if_changed(wrapper, f"// Generated by setup.py: the CUDA emulation build of {src}.\n"
                                      f'#include "{inner}"\n')
            sources.append(os.path.relpath(wrapper, ROOT))
        opt = ["-O0", "-g"] if env_flag("FASTVQ_DEBUG") else (["-O1", "-g"] if sanitize else ["-O2"])
        # torch's defines for nvcc, so the emulated sources see the same half/bfloat16 API as on the GPU
        cxx = opt + sanitize + [f for f in cpp_extension.COMMON_NVCC_FLAGS if f.startswith("-D")] + [
            f'-DFASTVQ_VERSION="{VERSION}"', "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter",
            "-Wno-unknown-pragmas"]  # g++ does not know #pragma unroll
        exts.append(cpp_extension.CppExtension(
            name=f"fastvq.{name}",
            sources=sources,
            include_dirs=[csrc, os.path.join(cuda_home, "include")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=sanitize,
        ))
    return exts


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class FastvqBuildExt(BuildExtension):
        """Keeps object files in build/ across builds (pip's editable mode would use a fresh temporary
        directory each time), so ninja only recompiles what changed."""

        def finalize_options(self):
            super().finalize_options()
            tag = f"{sys.implementation.cache_tag}-{'debug' if env_flag('FASTVQ_DEBUG') else 'release'}"
            self.build_temp = os.path.join(ROOT, "build", f"temp-{tag}")

    return FastvqBuildExt.with_options(use_ninja=True)


setup(
    name="fastvq",
    version=VERSION,
    packages=find_packages(include=["fastvq", "fastvq.*"]),
    ext_modules=make_extensions() + make_emu_extensions(),
    cmdclass={"build_ext": build_ext_class()},
    zip_safe=False,
)
