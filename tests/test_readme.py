"""The README's quick start runs as written (lucidrains' test_readme idea)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quick_start_runs():
    blocks = _python_blocks()
    assert blocks, "README has no python code block"
    namespace: dict = {}
    exec(compile(blocks[0], "README quick start", "exec"), namespace)
    assert 0.0 <= namespace["criterion"].stats["kept_fraction"] <= 1.0


def test_quick_start_is_short():
    assert len(_python_blocks()[0].strip().splitlines()) <= 15


def test_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_results_section_is_generated_from_the_result_files():
    import subprocess
    import sys

    root = README.parent
    out = subprocess.run(
        [sys.executable, "benchmarks/make_readme_tables.py", "--only", "accuracy_*__margin_beta1.5_T4.json"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout.rstrip("\n")
    text = README.read_text()
    section = text[text.index("<!-- results:begin -->\n") + len("<!-- results:begin -->\n"):
                   text.index("\n<!-- results:end -->")]
    assert section == out
