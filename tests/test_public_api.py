"""The public surface: a name that disappears or an optional import at top level fails here."""

from __future__ import annotations

import subprocess
import sys

import saflex_data

PUBLIC = {
    "CallableTransform", "CutMix", "DeviceAugment", "IndexedDataset", "MixParams", "MixUp", "OfflineAugmentations",
    "OfflineAugmentedDataset", "Rule", "SaflexBatchSampler", "SaflexCollate", "SaflexContrastiveLoss", "SaflexDataset",
    "SaflexLoss", "SaflexTarget", "SampleTransform", "TabularCutMix", "TaggedSample", "__version__", "functional",
}  # fmt: skip
FUNCTIONAL = {
    "validation_gradient", "last_layer_validation_gradient", "grad_inner_products", "inner_products_from_tangent",
    "last_layer_inner_products", "forward_with_tangent", "saflex_targets", "find_classifier",
}  # fmt: skip


def test_top_level_names():
    assert set(saflex_data.__all__) == PUBLIC
    for name in PUBLIC:
        assert hasattr(saflex_data, name), name


def test_functional_contract():
    assert FUNCTIONAL <= set(saflex_data.functional.__all__)
    for name in FUNCTIONAL:
        assert callable(getattr(saflex_data.functional, name)), name


def test_import_needs_only_torch():
    code = (
        "import sys, saflex_data, saflex_data.adapters\n"
        "bad = [m for m in ('torchvision', 'timm', 'kornia', 'albumentations', 'open_clip', 'pandas', 'PIL') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_library_imports_no_numpy():
    # numpy is not a dependency: with it made unimportable, torch and every module of the library but the adapters
    # still import, and nothing tries to pull numpy in behind the user's back
    code = (
        "import importlib, importlib.abc, pkgutil, sys\n"
        "class NoNumpy(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'numpy':\n"
        "            raise ModuleNotFoundError(f'numpy is blocked (asked for {name})', name=name)\n"
        "sys.meta_path.insert(0, NoNumpy())\n"
        "import torch, saflex_data\n"
        "names = [m.name for m in pkgutil.iter_modules(saflex_data.__path__, 'saflex_data.')]\n"
        "names = [n for n in names if n != 'saflex_data.adapters']\n"
        "assert len(names) >= 10, names\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'numpy']\n"
        "assert not hasattr(saflex_data, 'datasets')\n"
    )
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True)
