"""What `pip install alora-runtime` installs: the runtime, the kernels as ``alora_kernels``, the UI as ``alora_app``
(``alora ui``), the demo adapters, and the ``alora`` command. Checked on a wheel built from this tree."""

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
