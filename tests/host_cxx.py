"""Host C++ checks of headers under kernels/ (their device qualifiers defined away by the program): build one
program with the C++ compiler cpp_extension uses (CI has it) and return what it prints. Needs no GPU."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from flashjit import codegen


def run_program(tmp_path_factory, name: str, program: str, header: str) -> subprocess.CompletedProcess:
    """The finished run of `program` (C++17, -O2, kernels/ on the include path) built in a fresh folder; skips
    without a host compiler (naming `header`, the one checked), fails on a build error or a non-zero exit."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip(f"no host C++ compiler (c++ or g++) on PATH to build {header} for the CPU")
    work = tmp_path_factory.mktemp(name)
    (work / "check.cpp").write_text(program)
    build = subprocess.run([cxx, "-O2", "-std=c++17", "-I", str(codegen.kernels_dir()), "check.cpp", "-o", "check"],
                           cwd=work, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(work / "check")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run
