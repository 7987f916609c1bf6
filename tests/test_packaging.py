"""The wheel: one top-level package, the demo's model and images inside it, nothing a user's folder can shadow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a user's own ML project folder often holds: every name our code used to claim at the top level.
USER_FILES = {
    "model.py": "raise ImportError('the user model.py was imported')\n",
    "pipeline.py": "raise ImportError('the user pipeline.py was imported')\n",
    "schemas.py": "raise ImportError('the user schemas.py was imported')\n",
    "jobs/__init__.py": "raise ImportError('the user jobs package was imported')\n",
    "models/README.md": "the user's own checkpoints\n",
}


def make_user_folder(folder: Path) -> Path:
    for name, text in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the checkout: setuptools writes build/ and *.egg-info into the tree it builds."""
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source") / "blipbatch"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache"),
    )
    before = sorted(os.listdir(REPO))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert sorted(os.listdir(REPO)) == before  # nothing written into the checkout
    (built,) = out.glob("blipbatch-*.whl")
    return built


def test_wheel_installs_one_top_level_package_with_the_demo_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"blipbatch", wheel.name.split("-py")[0] + ".dist-info"}
    for part in ("model", "pipeline", "jobs", "schemas"):
        assert f"blipbatch/{part}/__init__.py" in names
    for data in (
        "blipbatch/py.typed",
        "blipbatch/jobs/demo_data/shapes-instructblip/model.safetensors",
        "blipbatch/jobs/demo_data/shapes-instructblip/qformer_tokenizer/tokenizer.json",
        "blipbatch/jobs/demo_data/images/red-circle.png",
    ):
        assert data in names
    assert not [n for n in names if "/tests/" in n or "__pycache__" in n]


def test_installed_wheel_runs_from_a_folder_that_holds_user_modules(wheel, tmp_path):
    """Installed from the wheel (not this checkout), run from a folder with a user's model.py & co: ours is used,
    and the shipped demo model answers about a shipped image."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    user = make_user_folder(tmp_path / "project")
    script = (
        "import blipbatch, blipbatch.pipeline.fetch, sys\n"
        "from PIL import Image\n"
        "from blipbatch import InstructBlipForConditionalGeneration, InstructBlipProcessor\n"
        "from blipbatch.jobs.demo import DEMO_MODEL, SAMPLE_IMAGES\n"
        "print(blipbatch.__file__)\n"
        "print('ray imported' if 'ray' in sys.modules else 'no ray')\n"
        "processor = InstructBlipProcessor.from_pretrained(DEMO_MODEL)\n"
        "model = InstructBlipForConditionalGeneration.from_pretrained(DEMO_MODEL)\n"
        "inputs = processor(images=Image.open(SAMPLE_IMAGES / 'red-circle.png'), text='What color is the shape?')\n"
        "print(processor.batch_decode(model.generate(**inputs, max_new_tokens=4), skip_special_tokens=True)[0])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=user, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    location, ray_state, answer = result.stdout.strip().splitlines()[-3:]
    assert Path(location).is_relative_to(target)
    assert ray_state == "no ray"
    assert "red" in answer


def test_python_dash_m_and_version(tmp_path):
    user = make_user_folder(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "blipbatch", "--version"], cwd=user, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("blipbatch ")
