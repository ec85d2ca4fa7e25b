"""examples/timm_train.py and examples/kornia_gpu.py end to end on a tiny PNG image folder (CPU)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("PIL")

from saflex_data.adapters.timm import has_task_api  # noqa: E402
from tests.test_adapters_timm import write_image_folder  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("timm_train_images")
    for seed, split in enumerate(("train", "holdout", "validation")):
        write_image_folder(root / split, n_per_class=12, seed=seed)
    return root


def run_timm_train(data_dir: Path, *extra: str, steps: int = 6) -> dict:
    example = load_example("timm_train")
    argv = [
        "--data-dir", str(data_dir), "--model", "test_resnet", "--img-size", "32", "-b", "8", "--epochs", "3",
        "--steps", str(steps), "--device", "cpu", "-j", "0", "--amp", "--amp-dtype", "bfloat16",
        "--log-interval", "2", "--lr", "2e-3", *extra,
    ]
    return example.main(argv)


CONFIGS = {
    "prefetcher": [],
    "no_prefetcher_channels_last": ["--no-prefetcher", "--channels-last"],
    "aug_splits_2": ["--aug-splits", "2"],
    "jvp_channels_last": ["--method", "jvp", "--channels-last"],
}


@pytest.mark.parametrize("extra", list(CONFIGS.values()), ids=list(CONFIGS))
def test_timm_train_saflex_reduces_loss_and_logs_stats(data_dir: Path, extra: list[str], capsys) -> None:
    summary = run_timm_train(data_dir, *extra)
    out = capsys.readouterr().out
    assert summary["steps"] == 6 and summary["finite"]
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"], summary["eval_before"]
    assert "saflex aug" in out and "kept" in out and "relabeled" in out
    assert len(summary["saflex"]) == 6
    for stats in summary["saflex"]:
        assert 0.0 <= stats["kept_fraction"] <= 1.0 and math.isfinite(stats["weight_mean"])
    assert summary["saflex"][-1]["step"] == 6.0
    expected_aug = 0.5 if "--aug-splits" in extra else None
    if expected_aug is not None:
        assert all(s["augmented_fraction"] == expected_aug for s in summary["saflex"])
    assert "RandAugment" in summary["op_stats"]


def test_timm_train_without_saflex(data_dir: Path, capsys) -> None:
    summary = run_timm_train(data_dir, "--no-saflex")
    assert summary["saflex"] == [] and summary["finite"]
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert "saflex" not in capsys.readouterr().out


@pytest.mark.skipif(not has_task_api(), reason="timm.task needs timm >= 1.0.23")
def test_timm_train_with_task(data_dir: Path) -> None:
    summary = run_timm_train(data_dir, "--use-task", steps=4)
    assert summary["finite"] and len(summary["saflex"]) == 4


@pytest.mark.slow
def test_timm_train_torch_compile(data_dir: Path) -> None:
    torch._dynamo.reset()
    summary = run_timm_train(data_dir, "--torchcompile", "aot_eager", "--channels-last", steps=4)
    assert summary["finite"] and len(summary["saflex"]) == 4
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]


@pytest.mark.parametrize("extra", [["--amp", "--channels-last"], ["--policy", "randaugment", "--method", "jvp"]],
                         ids=["jitter_bf16_channels_last", "randaugment_subset_jvp"])
def test_kornia_gpu_example_tags_on_device(data_dir: Path, extra: list[str], capsys) -> None:
    pytest.importorskip("kornia")
    example = load_example("kornia_gpu")
    summary = example.main(["--data-dir", str(data_dir), "--model", "test_resnet", "--device", "cpu", "--steps", "4",
                            "-j", "0", "-b", "8", *extra])
    assert summary["finite"] and len(summary["saflex"]) == 4
    assert any(s["augmented_fraction"] > 0 for s in summary["saflex"])
    assert any(s["augmented_fraction"] < 1 for s in summary["saflex"])  # a tagged subset, not the whole batch
    assert summary["op_stats"], "per-op statistics come from the kornia tags"
    assert "per-op keep/relabel rates" in capsys.readouterr().out


@pytest.mark.needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("extra", [[], ["--no-prefetcher"], ["--aug-splits", "2", "--channels-last"]],
                         ids=["prefetcher", "no_prefetcher", "aug_splits_channels_last"])
def test_timm_train_on_cuda(data_dir: Path, extra: list[str]) -> None:
    example = load_example("timm_train")
    summary = example.main([
        "--data-dir", str(data_dir), "--model", "test_resnet", "--img-size", "32", "-b", "8", "--epochs", "3",
        "--steps", "6", "--device", "cuda", "-j", "0", "--amp", "--amp-dtype", "bfloat16", "--lr", "2e-3", *extra,
    ])
    assert summary["finite"] and len(summary["saflex"]) == 6
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]



@pytest.mark.parametrize("extra, beta", [([], None), (["--beta", "0.5"], 0.5)], ids=["library-default", "given"])
def test_timm_train_beta_is_the_library_s_unless_given(
    data_dir: Path, extra: list[str], beta: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --rule/--beta/--tau the script passes none of them: the library's default rule and its beta apply."""
    import saflex_data.functional as SF
    from saflex_data import SaflexLoss

    made: list[SaflexLoss] = []

    class Recording(SaflexLoss):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    example = load_example("timm_train")
    monkeypatch.setattr(example, "SaflexLoss", Recording)
    argv = ["--data-dir", str(data_dir), "--model", "test_resnet", "--img-size", "32", "-b", "8", "--steps", "1",
            "--device", "cpu", "-j", "0", "--val-split", "", *extra]
    example.main(argv)
    default = SF.default_beta(made[0].rule.name)
    assert made[0].rule.beta == (default if beta is None else beta) and default != 0.5
