"""Every Python block of the README and of ``docs/*.md`` runs as written, on its own inputs (lucidrains' test_readme
idea), and so does every example in the adapters table. The README's first screen carries the generated verdict; its
links and the docstrings' references point to files that exist in the repository.

A block that must not run is preceded by ``<!-- norun: reason -->``; none is today.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
_NORUN = re.compile(r"<!-- norun: .+ -->")
_STDLIB = set(sys.stdlib_module_names)


def _sections(page: Path = README) -> list[tuple[str, str]]:
    """``(heading, text)`` of each ``## `` section (the text above the first one is under the page's title)."""
    text = page.read_text()
    if not text.startswith("## "):
        title = text.splitlines()[0].lstrip("# ").strip()
        text = f"## {title}\n" + text.split("\n", 1)[1]
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts), 2)]


def _fences(text: str) -> list[tuple[str, str, str]]:
    """``(info string, code, the line before the opening fence)`` of every fenced block of ``text``."""
    blocks, lines, i = [], text.splitlines(keepends=True), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            info, before, j = lines[i][3:].strip(), lines[i - 1] if i else "", i + 1
            while not lines[j].startswith("```"):
                j += 1
            blocks.append((info, "".join(lines[i + 1 : j]), before))
            i = j
        i += 1
    return blocks


def _python_blocks() -> list[tuple[str, str, bool]]:
    """``(page: section heading, code, runs)`` of every Python block of the README and the docs, in order."""
    return [(f"{page.name}: {heading}", code, not _NORUN.search(before)) for page in PAGES
            for heading, body in _sections(page)
            for info, code, before in _fences(body) if info == "python"]  # fmt: skip


def _needs(code: str) -> list[str]:
    """The top-level non-stdlib modules a block imports (besides torch and saflex_data)."""
    names = re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", code, flags=re.M)
    return sorted({n for n in names if n not in _STDLIB and n not in ("torch", "saflex_data", "__future__")})


def _skip_unless_installed(code: str) -> None:
    for module in _needs(code):
        pytest.importorskip(module)


BLOCKS = _python_blocks()


def test_blocks_found_and_none_silently_skipped() -> None:
    headings = [h for h, _, _ in BLOCKS]
    assert headings[0] == "README.md: Quick start"
    assert {"distributed.md: Multi-GPU (DDP, torchrun)", "contrastive.md: Contrastive fine-tuning (CLIP / FLYP)",
            "README.md: Adapters"} <= set(headings)  # fmt: skip
    assert all(runs for _, _, runs in BLOCKS), "a block is marked norun: say why in the marker and keep it rare"
    # every fenced block that looks like Python is tagged python (an untagged one would escape this test)
    for page in PAGES:
        for info, code, _ in _fences(page.read_text()):
            if info in ("", "py", "python3"):
                assert not re.search(r"^(import |from \w+ import |def )", code, flags=re.M), (page.name, code[:200])


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{i}-{h}" for i, (h, _, _) in enumerate(BLOCKS)])
def test_python_block_runs_as_a_script(index: int, tmp_path: Path) -> None:
    heading, code, runs = BLOCKS[index]
    if not runs:
        pytest.skip("marked norun in the README")
    _skip_unless_installed(code)
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}  # fmt: skip
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=280)  # fmt: skip
    assert result.returncode == 0, f"README block {index} ({heading}) failed:\n{result.stderr[-3000:]}"


def test_quick_start_decides() -> None:
    namespace: dict = {}
    exec(compile(BLOCKS[0][1], "README quick start", "exec"), namespace)
    assert 0.0 <= namespace["criterion"].stats["kept_fraction"] <= 1.0


def test_quick_start_is_short() -> None:
    assert len(BLOCKS[0][1].strip().splitlines()) <= 15


def _adapter_table() -> tuple[str, list[str]]:
    body = dict(_sections())["Adapters"]
    setup = next(code for info, code, _ in _fences(body) if info == "python")
    rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| upstream")]
    examples = [code for row in rows for code in re.findall(r"`([^`]*)`", row.rstrip(" |").rsplit("|", 1)[-1])]
    return setup, examples


def test_adapter_table_examples_run() -> None:
    setup, examples = _adapter_table()
    _skip_unless_installed(setup)
    from torch.utils.data import DataLoader

    from saflex_data import OfflineAugmentedDataset, SaflexCollate, SaflexTarget

    assert len(examples) >= 12
    names: dict = {}
    exec(compile(setup, "README adapters table setup", "exec"), names)
    for code in examples:
        namespace = dict(names)
        *statements, last = code.split("; ")
        for statement in statements:
            exec(statement, namespace)
        try:
            value = eval(last, namespace)
        except SyntaxError:  # an assignment
            exec(last, namespace)
            value = None
        # what each example builds also works on data
        if isinstance(value, DataLoader):
            inputs, target = next(iter(value))
            assert isinstance(target, SaflexTarget) and len(target) == len(inputs), code
        elif isinstance(value, SaflexCollate):  # a collate is shown on the README's own dataset
            batch = [names["train"][i] for i in range(8)]
            inputs, target = value(batch)
            assert isinstance(target, SaflexTarget) and len(target) == len(inputs), code
        elif isinstance(namespace.get("ds"), OfflineAugmentedDataset):
            assert len(namespace["ds"]) == len(names["train"]) + len(names["made"]), code
        elif value is None:
            assert isinstance(namespace["target"], SaflexTarget), code
        else:
            assert callable(value), code


def test_first_screen_says_what_it_does_the_verdict_and_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move details to docs/"
    first = "\n".join(lines[:40])
    assert "SaflexLoss" in first and "drops" in first  # what it does
    assert "<!-- verdict:end -->" in first and "Measured verdict" in first  # the measured verdict, whole
    assert "make demo" in first and "make test" in first


def _generated(*args: str) -> str:
    return subprocess.run([sys.executable, "benchmarks/make_readme_tables.py", *args], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.rstrip("\n")  # fmt: skip


def _between(text: str, name: str) -> str:
    begin, end = f"<!-- {name}:begin -->\n", f"\n<!-- {name}:end -->"
    return text[text.index(begin) + len(begin) : text.index(end)]


def test_readme_verdict_is_generated_from_the_suite() -> None:
    assert _between(README.read_text(), "verdict") == _generated("--verdict"), (
        "run: python benchmarks/make_readme_tables.py --verdict, and paste it between the verdict markers"
    )


_LINK = re.compile(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)")
_DOC_REF = re.compile(r"docs/[\w/]+\.md(?:#[\w-]+)?")


def _anchors(path: Path) -> set[str]:
    return set(re.findall(r'<a id="([\w-]+)"></a>', path.read_text()))


def test_readme_and_docs_links_point_into_the_repository() -> None:
    for page in PAGES:
        for target, anchor in _LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.name} links to {target}, which is not in the repository"
            if anchor and path.suffix == ".md" and path != README:
                assert anchor in _anchors(path), f"{page.name} links to {target}#{anchor}: no such anchor"


def test_references_point_into_the_repository() -> None:
    files = [README, *ROOT.glob("docs/*.md"), *ROOT.glob("saflex_data/**/*.py"), *ROOT.glob("examples/*.py"),
             *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py")]  # fmt: skip
    files = [f for f in files if f != Path(__file__).resolve()]
    banned = re.compile(r"\bSPEC\b|ECOSYSTEM|STYLE\.md|DATA\.md")
    issue = re.compile(r"\bissues? #?\d+", flags=re.I)
    for path in files:
        text = path.read_text()
        hits = banned.findall(text) + issue.findall(text)
        assert not hits, f"{path.relative_to(ROOT)} cites something outside the repository: {hits}"
        for ref in _DOC_REF.findall(text):
            doc, _, anchor = ref.partition("#")
            assert (ROOT / doc).is_file(), f"{path.relative_to(ROOT)} refers to {doc}, which does not exist"
            if anchor:
                assert anchor in _anchors(ROOT / doc), f"{path.relative_to(ROOT)} refers to {ref}: no such anchor"


def test_contrastive_table_is_generated_from_the_example_results() -> None:
    assert _between((ROOT / "docs" / "contrastive.md").read_text(), "contrastive") == _generated("--contrastive")


def test_demo_paragraph_is_generated_from_the_demo_results() -> None:
    assert _between((ROOT / "docs" / "results.md").read_text(), "demo") == _generated("--demo")


def test_results_section_is_generated_from_the_result_files() -> None:
    section = _between((ROOT / "docs" / "results.md").read_text(), "results")
    assert section == _generated("--only", "accuracy_*__margin_beta1.5_T4.json")

