"""Build script for bn_cy's compiled core.

The extension is plain C99 kernels (src_c/) plus a thin Cython wrapper. Two decisions are made here,
at build time, by probing the compiler rather than guessing from the platform:

* OpenMP: a small program is compiled, linked *and run* with the candidate flags (gcc/clang
  ``-fopenmp``; Apple clang ``-Xpreprocessor -fopenmp -lomp``; MSVC ``/openmp``). If none works the
  build warns and produces serial kernels. ``BN_CY_OPENMP=0`` forces a serial build;
  ``BN_CY_REQUIRE_OPENMP=1`` turns a missing OpenMP into a build error (CI sets it).
* SIMD: on x86-64 with gcc/clang, the kernels are compiled three times -- for the baseline ISA,
  for AVX2+FMA (src_c/bn_kernels_avx2.c) and, where the compiler takes its target pragma, for
  AVX-512 (src_c/bn_kernels_avx512.c) -- and the choice is made at run time from the CPU, so a
  wheel built here runs on any x86-64 machine. ``BN_CY_SIMD`` caps the variants, with the same
  values at build time (which are compiled) and at run time (which is used): ``baseline`` (or
  ``0``) the baseline only, ``avx2`` the baseline and AVX2+FMA; unset, all of them. A build for
  CPUs without AVX-512 can leave that variant out and compile a third less.

The extension's C files are compiled in parallel, one compiler process per file, as many at a
time as there are cores (``BN_CY_BUILD_JOBS=N`` sets the number; 1 compiles them in turn). The
kernels of each SIMD variant are three files (float32 + float64, float16, bfloat16; 17 - 28 s
each with gcc -O3), so with enough cores the build takes about as long as the longest of them.
"""

import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\\n", n > 0 && omp_get_max_threads() > 0);
        return 0;
    }
    """
)


# Compiled (and run, without calling the function) to learn whether the compiler accepts the
# target pragma of src_c/bn_kernels_avx512.c.
AVX512_PROBE = textwrap.dedent(
    """
    #include <stdio.h>
    #if defined(__clang__)
    #pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"), min_vector_width(512))), apply_to = function)
    #else
    #pragma GCC push_options
    #pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
    #endif
    void scale(float *a, int n) { int i; for (i = 0; i < n; i++) a[i] *= 2.0f; }
    #if defined(__clang__)
    #pragma clang attribute pop
    #else
    #pragma GCC pop_options
    #endif
    int main(void) { printf("1\\n"); return 0; }
    """
)


def _env_flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "default"):
        return None
    return value not in ("0", "false", "no", "off")


def _openmp_candidates(compiler_type):
    if compiler_type == "msvc":
        return [(["/openmp"], [])]
    candidates = [(["-fopenmp"], ["-fopenmp"])]
    if sys.platform == "darwin":
        # Apple clang has no driver support; libomp (e.g. from Homebrew) provides the runtime.
        prefixes = [os.environ.get("BN_CY_LIBOMP_PREFIX"), "/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
        for prefix in filter(None, prefixes):
            candidates.append(
                (
                    ["-Xpreprocessor", "-fopenmp", "-I" + os.path.join(prefix, "include")],
                    ["-lomp", "-L" + os.path.join(prefix, "lib")],
                )
            )
        candidates.append((["-Xpreprocessor", "-fopenmp"], ["-lomp"]))
    return candidates


def _compiles_and_runs(compiler, source, compile_args, link_args):
    """Compile, link and run `source`; True when it prints 1."""
    tmp = tempfile.mkdtemp(prefix="bn_cy_probe_")
    cwd = os.getcwd()
    try:
        os.chdir(tmp)
        with open("probe.c", "w") as f:
            f.write(source)
        objects = compiler.compile(["probe.c"], extra_postargs=compile_args)
        exe = "probe" + (".exe" if sys.platform == "win32" else "")
        # the extension is linked with $LDFLAGS (e.g. -fsanitize=address to match $CFLAGS);
        # an executable is not, so the probe adds them itself
        env_ldflags = shlex.split(os.environ.get("LDFLAGS", "")) if compiler.compiler_type != "msvc" else []
        compiler.link_executable(objects, "probe", extra_postargs=link_args + env_ldflags)
        out = subprocess.run([os.path.join(tmp, exe)], capture_output=True, text=True, timeout=60)
        return out.returncode == 0 and out.stdout.strip() == "1"
    except Exception:  # any compile, link or run failure means "not available"
        return False
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)


def _accepts_flag(compiler, flag):
    """True when the compiler compiles a trivial file with `flag` (warnings count as refusal)."""
    return _compiles_and_runs(
        compiler, '#include <stdio.h>\nint main(void) { printf("1\\n"); return 0; }\n',
        [flag, "-Werror"], []
    )


# BN_CY_SIMD at build time: the widest variant compiled (the values the run-time cap takes, and the
# on/off spellings of the other switches)
_SIMD_CAPS = {"baseline": 0, "avx2": 1, "avx2+fma": 1, "avx512": 2,
              "0": 0, "false": 0, "no": 0, "off": 0, "1": 2, "true": 2, "yes": 2, "on": 2}


def _simd_cap():
    """The widest SIMD variant to compile, from $BN_CY_SIMD: 0 baseline, 1 AVX2, 2 AVX-512."""
    value = os.environ.get("BN_CY_SIMD", "").strip().lower()
    if value in ("", "default"):
        return 2
    if value not in _SIMD_CAPS:
        raise RuntimeError("BN_CY_SIMD must be one of %s (or unset), got %r"
                           % (", ".join(sorted(_SIMD_CAPS)), value))
    return _SIMD_CAPS[value]


def _build_jobs():
    """Compiler processes to run at once: $BN_CY_BUILD_JOBS (a positive integer), else the cores."""
    value = os.environ.get("BN_CY_BUILD_JOBS", "").strip()
    if value:
        try:
            jobs = int(value)
        except ValueError:
            raise RuntimeError("BN_CY_BUILD_JOBS must be a positive integer, got %r" % value) from None
        if jobs < 1:
            raise RuntimeError("BN_CY_BUILD_JOBS must be a positive integer, got %r" % value)
        return jobs
    return os.cpu_count() or 1


def _compile_in_parallel(compiler, jobs):
    """Make compiler.compile compile its sources `jobs` at a time, each in its own call (the
    objects come back in the order of the sources, as from one call)."""
    serial = compiler.compile

    def compile(sources, *args, **kwargs):
        if jobs <= 1 or len(sources) <= 1:
            return serial(sources, *args, **kwargs)
        with ThreadPoolExecutor(min(jobs, len(sources))) as pool:
            parts = list(pool.map(lambda src: serial([src], *args, **kwargs), sources))
        return [obj for part in parts for obj in part]

    compiler.compile = compile


def _is_x86_64():
    return platform.machine().lower() in ("x86_64", "amd64", "x64")


class BuildExt(build_ext):
    def build_extensions(self):
        ctype = self.compiler.compiler_type
        compile_args, link_args, macros = [], [], []
        if ctype == "msvc":
            compile_args += ["/O2"]
        else:
            compile_args += ["-O3", "-std=c99", "-fno-math-errno", "-fno-trapping-math"]
            # gcc's loop interchange turns the channel-inner loops of the rows kernels into
            # strided scalar loops over positions; keep the loop order as written.
            if _accepts_flag(self.compiler, "-fno-loop-interchange"):
                compile_args.append("-fno-loop-interchange")

        want = _env_flag("BN_CY_OPENMP")
        require = _env_flag("BN_CY_REQUIRE_OPENMP")
        openmp = False
        if want is not False:
            for c_args, l_args in _openmp_candidates(ctype):
                if _compiles_and_runs(self.compiler, OPENMP_PROBE, c_args, l_args):
                    compile_args += c_args
                    link_args += l_args
                    openmp = True
                    break
        if not openmp:
            message = "OpenMP was disabled by BN_CY_OPENMP=0" if want is False else (
                "no working OpenMP found for this compiler"
            )
            if require:
                raise RuntimeError(message + " and BN_CY_REQUIRE_OPENMP=1 is set")
            warnings.warn(message + ": bn_cy's kernels will run serially", stacklevel=1)

        simd = _simd_cap()
        avx512 = False
        if simd >= 1 and ctype != "msvc" and _is_x86_64():
            macros.append(("BNCY_HAVE_AVX2_VARIANT", "1"))
            # the AVX-512 variant needs a compiler that knows its target pragma
            avx512 = simd >= 2 and _compiles_and_runs(self.compiler, AVX512_PROBE, ["-Werror"], [])
            if avx512:
                macros.append(("BNCY_HAVE_AVX512_VARIANT", "1"))

        macros.append(("BNCY_COMPILER_TYPE", '"%s"' % ctype))
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + compile_args
            ext.extra_link_args = list(ext.extra_link_args or []) + link_args
            ext.define_macros = list(ext.define_macros or []) + macros
        print(
            "bn_cy build: compiler=%s openmp=%s avx2_variant=%s avx512_variant=%s"
            % (ctype, openmp, ("BNCY_HAVE_AVX2_VARIANT", "1") in macros, avx512)
        )
        _compile_in_parallel(self.compiler, _build_jobs())
        super().build_extensions()


def extensions():
    from Cython.Build import cythonize

    ext = Extension(
        "bn_cy._kernels",
        sources=[
            # the longest first (gcc -O3: float16 ~28 s, float32 + float64 ~20 s, bfloat16 ~17 s,
            # the Cython module ~7 s): parallel jobs start in this order
            "src_c/bn_kernels_base_f16.c",
            "src_c/bn_kernels_avx2_f16.c",
            "src_c/bn_kernels_avx512_f16.c",
            "src_c/bn_kernels_base.c",
            "src_c/bn_kernels_avx2.c",
            "src_c/bn_kernels_avx512.c",
            "src_c/bn_kernels_base_bf16.c",
            "src_c/bn_kernels_avx2_bf16.c",
            "src_c/bn_kernels_avx512_bf16.c",
            "bn_cy/_kernels.pyx",
            "src_c/bn_dispatch.c",
        ],
        include_dirs=["src_c", np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        depends=[
            "src_c/bn_cy.h",
            "src_c/bn_internal.h",
            "src_c/bn_kernels_template.h",
            "src_c/bn_kernels_instances.h",
            "src_c/bn_stream.h",
        ],
    )
    return cythonize([ext], compiler_directives={"language_level": 3}, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
