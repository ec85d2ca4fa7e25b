"""The train.py patches in examples/: docs/timm.md shows exactly the train.py one, their imports exist, they apply.

``python -m tests.test_timm_patch --write`` rewrites docs/timm.md's diff block from ``examples/timm_train_py.patch``.
Applying needs timm's sources: set ``SAFLEX_TIMM_SRC`` to a clone (or a bare git directory) of
pytorch-image-models; without it those tests skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCHES = {"train.py": ROOT / "examples" / "timm_train_py.patch",
           "legacy_train.py": ROOT / "examples" / "timm_legacy_train_py.patch"}
README = ROOT / "docs" / "timm.md"  # the page with the timm recipe (the README links to it)
_BLOCK = re.compile(r"(# Using saflex_data with timm's train.py\n.*?```diff\n)(.*?)(```\n)", re.S)


def diff_body(patch: Path) -> str:
    """The diff itself: everything from the first ``--- a/`` line (the header above it is prose)."""
    text = patch.read_text()
    return text[text.index("--- a/"):]


def commit_of(patch: Path) -> str:
    found = re.search(r"timm commit ([0-9a-f]{40})", patch.read_text())
    assert found, f"{patch.name} must name the timm commit it was made against"
    return found.group(1)


def test_readme_block_is_the_patch() -> None:
    found = _BLOCK.search(README.read_text())
    assert found, "docs/timm.md needs a ```diff block under \"Using saflex_data with timm's train.py\""
    assert found.group(2) == diff_body(PATCHES["train.py"]), "run: python -m tests.test_timm_patch --write"


@pytest.mark.parametrize("name", list(PATCHES))
def test_patch_names_its_commit_and_imports_exist(name: str) -> None:
    pytest.importorskip("timm")
    patch = PATCHES[name]
    commit_of(patch)
    added = [line[1:] for line in diff_body(patch).splitlines() if line.startswith("+") and not line.startswith("+++")]
    imports = "\n".join(added[: next(i for i, line in enumerate(added) if "log_line" in line) + 1])
    assert imports.startswith("from saflex_data import SaflexLoss\n")
    exec(compile(imports, name, "exec"), {})  # every name the patch imports exists


def _timm_source(name: str, commit: str, dest: Path) -> Path:
    src = os.environ.get("SAFLEX_TIMM_SRC")
    if not src:
        pytest.skip("set SAFLEX_TIMM_SRC to a clone or bare git directory of pytorch-image-models")
    if shutil.which("patch") is None:
        pytest.skip("needs the patch program")
    target = dest / name
    if (Path(src) / name).is_file():
        shutil.copy(Path(src) / name, target)
    else:
        text = subprocess.run(["git", f"--git-dir={src}", "show", f"{commit}:{name}"], capture_output=True,
                              text=True, check=True).stdout
        target.write_text(text)
    return target


@pytest.mark.parametrize("name", list(PATCHES))
def test_patch_applies_cleanly(name: str, tmp_path: Path) -> None:
    patch = PATCHES[name]
    _timm_source(name, commit_of(patch), tmp_path)
    result = subprocess.run(["patch", "-p1", "--dry-run", "-i", str(patch)], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "offset" not in result.stdout and "fuzz" not in result.stdout, result.stdout


def _write_readme() -> None:
    text = README.read_text()
    new = _BLOCK.sub(lambda m: m.group(1) + diff_body(PATCHES["train.py"]) + m.group(3), text, count=1)
    README.write_text(new)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        _write_readme()
    else:
        sys.exit("usage: python -m tests.test_timm_patch --write")
