"""Which BLAS MLX computes with on Linux, and the one line that says when it is the slow one."""

import ctypes
import json
import os
import subprocess
import sys

import pytest

from elm_mlx import _blas

linux_cpu = pytest.mark.skipif(sys.platform != "linux", reason="the BLAS is chosen on Linux only")


def in_fresh_python(env: dict) -> dict:
    """elm_mlx imported first in a new interpreter, as the CLIs do: its BLAS and its notice."""
    code = "import json, elm_mlx; from elm_mlx._blas import slow_blas_notice; print(json.dumps([elm_mlx.BLAS, slow_blas_notice()]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    blas, notice = json.loads(result.stdout)
    return {"blas": blas, "notice": notice}


def openblas_installed() -> bool:
    try:
        ctypes.CDLL("libopenblas.so.0")
        return True
    except OSError:
        return False


@linux_cpu
def test_reference_blas_is_said_in_one_line():
    seen = in_fresh_python({"ELM_MLX_BLAS": "reference"})
    assert seen["blas"].startswith("reference")
    assert seen["notice"] == _blas.NOTICE and "\n" not in _blas.NOTICE
    assert "libopenblas0-pthread" in seen["notice"] and "elm-mlx[mkl]" in seen["notice"]


@linux_cpu
@pytest.mark.skipif(not openblas_installed(), reason="OpenBLAS is not installed here")
def test_no_notice_with_openblas():
    seen = in_fresh_python({"ELM_MLX_BLAS": "openblas"})
    assert seen["blas"] == "openblas (libopenblas.so.0)" and seen["notice"] is None
    assert in_fresh_python({})["notice"] is None  # auto finds it too


def test_openblas_first_then_mkl_newest_first(tmp_path):
    """The search order, on a faked prefix: nothing is loaded."""
    venv, user = tmp_path / "venv", tmp_path / "user"
    for prefix, names in ((venv, ["libmkl_rt.so.2", "libmkl_rt.so.3", "libmkl_core.so.3"]), (user, ["libmkl_rt.so.3"])):
        (prefix / "lib").mkdir(parents=True)
        for name in names:
            (prefix / "lib" / name).write_bytes(b"")
    prefixes = [str(venv), str(user), str(venv), str(tmp_path / "none")]
    mkl = [str(venv / "lib" / "libmkl_rt.so.3"), str(venv / "lib" / "libmkl_rt.so.2"), str(user / "lib" / "libmkl_rt.so.3")]
    assert _blas.candidates("auto", prefixes) == ["libopenblas.so.0", "libopenblas.so", *mkl]
    assert _blas.candidates("mkl", prefixes) == mkl
    assert _blas.candidates("openblas", prefixes) == ["libopenblas.so.0", "libopenblas.so"]


def test_mkl_is_looked_for_in_the_interpreters_prefix_and_user_base(monkeypatch, tmp_path):
    """Where pip puts the mkl wheel's data files: <venv>/lib, or <user base>/lib after --user."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libmkl_rt.so.3").write_bytes(b"")
    for name in ("prefix", "exec_prefix", "base_prefix"):
        monkeypatch.setattr(sys, name, "/nonexistent")
    monkeypatch.setattr(_blas.site, "getuserbase", lambda: "/nonexistent")
    assert _blas.mkl_libraries() == []
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert _blas.mkl_libraries() == [tmp_path / "lib" / "libmkl_rt.so.3"]
    monkeypatch.setattr(sys, "prefix", "/nonexistent")
    monkeypatch.setattr(_blas.site, "getuserbase", lambda: str(tmp_path))
    assert _blas.mkl_libraries() == [tmp_path / "lib" / "libmkl_rt.so.3"]


@linux_cpu
@pytest.mark.skipif(not _blas.mkl_libraries(), reason="no mkl wheel installed (pip install 'elm-mlx[mkl]')")
def test_mkl_from_the_wheel_is_used_and_no_notice():
    seen = in_fresh_python({"ELM_MLX_BLAS": "mkl"})
    assert seen["blas"].startswith("mkl (") and "libmkl_rt.so." in seen["blas"] and seen["notice"] is None


@linux_cpu
@pytest.mark.skipif(bool(_blas.mkl_libraries()), reason="a real mkl wheel is installed and would be found first")
def test_an_unloadable_mkl_falls_back_to_the_reference_blas(tmp_path):
    """A broken libmkl_rt file is skipped, not an error at import time."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libmkl_rt.so.3").write_bytes(b"not a library")
    seen = in_fresh_python({"ELM_MLX_BLAS": "mkl", "PYTHONUSERBASE": str(tmp_path)})
    assert seen["blas"] == "reference (no OpenBLAS or MKL found)" and seen["notice"] == _blas.NOTICE
