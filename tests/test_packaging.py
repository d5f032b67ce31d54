"""What `pip install alora-runtime` installs: the runtime, the kernels as ``alora_kernels``, the UI as ``alora_app``
(``alora ui``), the demo adapters, and the ``alora`` command. Checked on a wheel built from this tree."""

import importlib.machinery
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for item in ("pyproject.toml", "README.md", "alora", "kernels", "app"):  # a copy: the build leaves files behind
        path = REPO / item
        if path.is_dir():
            shutil.copytree(path, src / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / item)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (built,) = out.glob("alora_runtime-*.whl")
    with zipfile.ZipFile(built) as z:
        yield z


def test_wheel_installs_the_ui_as_alora_app(wheel):
    names = set(wheel.namelist())
    for module in ("__init__", "__main__", "cli", "ui", "session", "render"):
        assert f"alora_app/{module}.py" in names, module
    assert not any(n.startswith(("app/", "kernels/")) for n in names)  # no top-level names that could shadow others
    assert "alora_kernels/__init__.py" in names and "alora/models/loader.py" in names


def test_wheel_holds_every_subpackage_of_alora(wheel):
    """A subpackage missing from pyproject's ``packages`` list would import here and fail once installed."""
    names = set(wheel.namelist())
    for init in sorted((REPO / "alora").rglob("__init__.py")):
        assert init.relative_to(REPO).as_posix() in names, f"{init.parent.relative_to(REPO)} is not packaged"


def test_wheel_ships_the_demo_adapters(wheel):
    for name in ("title", "summary", "followup", "title_lora"):
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert f"alora/demo_adapters/{name}/{f}" in wheel.namelist(), (name, f)


def test_wheel_declares_the_alora_command(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "alora = alora.cli:main" in wheel.read(entry_points).decode()


def test_the_ui_package_imports_by_its_installed_name():
    """The editable install of this tree maps ``alora_app`` to app/; its modules import each other relatively."""
    code = "import alora_app.cli, alora_app.ui; print(alora_app.ui.ChatUI.__module__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == "alora_app.ui"


def test_the_checkout_root_on_sys_path_does_not_shadow_hugging_faces_kernels():
    """``python -m ...`` from the checkout puts its root, and so our kernels/ folder, first on sys.path; transformers
    imports Hugging Face's ``kernels`` package when it is installed, and must get that package, not ours."""
    code = ("import kernels, alora_kernels; "
            "print(kernels.__name__, kernels.__file__); print(alora_kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    installed = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if installed is None:  # no HF package: the name stays free
        assert out.returncode == 1 and "No module named 'kernels'" in out.stderr
        return
    assert out.returncode == 0, out.stderr
    ours, theirs = out.stdout.splitlines()[1], out.stdout.splitlines()[0]
    assert Path(ours).resolve() == REPO / "kernels" / "__init__.py"
    assert Path(theirs.split()[1]).resolve() == Path(installed.origin).resolve()


def test_the_cpu_kernels_build_where_the_cpu_and_a_compiler_allow():
    """Every CPU-kernel test skips where the extension is unavailable, and the engine falls back to torch with one
    warning: a build error on a machine that can build it must fail here, not pass as skips."""
    import torch

    from alora_kernels import cpu_gemv

    flags = cpu_gemv._cpu_flags()
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags or not shutil.which("c++"):
        pytest.skip("this machine cannot build the CPU kernels (no AVX-512 or no C++ compiler)")
    assert cpu_gemv.available(torch.float32) and cpu_gemv.available(torch.int8)
    assert cpu_gemv.available(torch.bfloat16) == ("avx512_bf16" in flags)
