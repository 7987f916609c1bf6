"""Run mypy over the `blipbatch` package as it installs.

The package's parts live in top-level folders (pyproject's [tool.setuptools.package-dir]: model/ is
blipbatch.model, ...), a mapping that the editable install makes with an import hook, which mypy cannot follow.
So this builds the installed layout from symbolic links in a temporary folder, checks it there, and prints each
error under its path in the repository. Extra arguments go to mypy. Exit status: mypy's.

    .venv/bin/python tools/typecheck.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def link_tree(folder: Path) -> None:
    """`folder`/blipbatch laid out as installed: the package's own files, and a link per mapped subpackage."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    package = folder / "blipbatch"
    package.mkdir()
    for child in (ROOT / mapping["blipbatch"]).iterdir():
        if child.name != "__pycache__":
            (package / child.name).symlink_to(child)
    for name, source in mapping.items():
        if name != "blipbatch":
            (folder / name.replace(".", "/")).symlink_to(ROOT / source, target_is_directory=True)


def repository_paths(line: str, folder: Path) -> str:
    """An error line with its path in the temporary tree replaced by the file's path in the repository."""
    path, sep, rest = line.partition(":")
    if not sep or not path.startswith("blipbatch/"):
        return line
    return f"{(folder / path).resolve().relative_to(ROOT)}{sep}{rest}"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="blipbatch-mypy-") as name:
        folder = Path(name)
        link_tree(folder)
        command = [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "-p",
            "blipbatch",
            *sys.argv[1:],
        ]
        env = dict(os.environ, MYPYPATH=str(folder))
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        for line in result.stdout.splitlines():
            print(repository_paths(line, folder))
        sys.stderr.write(result.stderr)
        return result.returncode


if __name__ == "__main__":
    sys.exit(main())
