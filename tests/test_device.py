"""DeviceAugment: any batch callable on the device, to all rows, a random subset or a clean copy, with tags."""

from __future__ import annotations

import pytest
import torch

from saflex_data.batch import SaflexTarget
from saflex_data.device import DeviceAugment, as_target
from saflex_data.mixing import MixUp


def devices() -> list:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]


def need(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


@pytest.mark.parametrize("device", devices())
class TestModes:
    def test_all(self, device: str) -> None:
        need(device)
        x, y = torch.randn(4, 3, 5, device=device), torch.arange(4, device=device)
        out, target = DeviceAugment(flip, mode="all")(x, y)
        assert torch.equal(out, x.flip(-1)) and target.is_augmented.all() and target.op_names == ("flip",)
        assert target.device.type == device

    @pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
    def test_subset(self, device: str, p: float) -> None:
        need(device)
        x, y = torch.randn(32, 3, 5, device=device), torch.arange(32, device=device) % 4
        out, target = DeviceAugment(flip, mode="subset", p=p, generator=torch.Generator().manual_seed(0))(x, y)
        aug = target.is_augmented
        assert torch.equal(out[~aug], x[~aug]) and torch.equal(out[aug], x[aug].flip(-1))
        assert torch.equal(target.labels, y) and target.index.tolist() == list(range(32))
        assert target.op.tolist() == [0 if a else -1 for a in aug.tolist()]
        if p in (0.0, 1.0):
            assert int(aug.sum()) == 32 * p
        else:
            assert 6 < int(aug.sum()) < 26

    def test_copy(self, device: str) -> None:
        need(device)
        x, y = torch.randn(3, 4, device=device), torch.tensor([2, 0, 1], device=device)
        out, target = DeviceAugment(flip, mode="copy")(x, y)
        assert torch.equal(out[:3], x) and torch.equal(out[3:], x.flip(-1))
        assert target.is_augmented.tolist() == [False] * 3 + [True] * 3
        assert target.index.tolist() == [0, 1, 2, 0, 1, 2] and target.labels.tolist() == [2, 0, 1, 2, 0, 1]


def test_tagged_fn_in_subset_mode_makes_labels_soft() -> None:
    x, y = torch.randn(16, 4), torch.arange(16) % 3
    aug = DeviceAugment(
        MixUp(num_classes=3, generator=torch.Generator().manual_seed(1)),
        mode="subset",
        p=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    out, target = aug(x, y)
    assert target.labels.shape == (16, 3) and target.op_names == ("mixup",)
    clean = ~target.is_augmented
    assert torch.equal(out[clean], x[clean])
    torch.testing.assert_close(target.labels[clean], torch.nn.functional.one_hot(y[clean], 3).float())


def test_existing_target_keeps_ops() -> None:
    x = torch.randn(4, 2)
    t = SaflexTarget(
        torch.arange(4),
        torch.tensor([True, False, False, False]),
        torch.arange(4),
        torch.tensor([0, -1, -1, -1]),
        ("randaug",),
    )
    _, target = DeviceAugment(flip, mode="copy", op_name="flip")(x, t)
    assert target.op_names == ("randaug", "flip") and target.op.tolist() == [0, -1, -1, -1, 1, 1, 1, 1]


def test_is_a_module_that_moves_its_fn() -> None:
    lin = torch.nn.Linear(3, 3)
    aug = DeviceAugment(lin, mode="all")
    assert list(aug.parameters()) == list(lin.parameters())


class TestErrors:
    def test_fn_returns_different_batch_size(self) -> None:
        aug = DeviceAugment(lambda x: x[:-1], mode="all", op_name="drop")
        with pytest.raises(
            ValueError,
            match=r"DeviceAugment\(fn=<lambda>\): fn returned a batch of 3 rows \(shape "
            r"\(3, 2\)\) for an input batch of 4 rows",
        ):
            aug(torch.randn(4, 2), torch.arange(4))

    def test_fn_changes_shape_in_subset_mode(self) -> None:
        def widen(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x], dim=1)

        with pytest.raises(
            ValueError,
            match=r"DeviceAugment\(fn=widen\): fn returned shape \(\d+, 4\) .* mode='subset' "
            "writes the rows back",
        ):
            DeviceAugment(widen, mode="subset", p=1.0)(torch.randn(4, 2), torch.arange(4))

    def test_fn_returns_non_tensor(self) -> None:
        with pytest.raises(TypeError, match=r"fn must return a tensor, but returned an object of type list"):
            DeviceAugment(lambda x: [x], mode="all")(torch.randn(2, 2), torch.arange(2))

    @pytest.mark.parametrize(
        "labels, match",
        [
            (torch.rand(4), r"labels of shape \(B,\) must be int class indices"),
            (torch.zeros(4, 3, dtype=torch.long), r"labels of shape \(B, K\) must be float probabilities"),
            ([0, 1, 2, 3], "labels must be class indices .* but got an object of type list"),
        ],
    )
    def test_bad_labels(self, labels: object, match: str) -> None:
        with pytest.raises(TypeError, match=match):
            DeviceAugment(flip)(torch.randn(4, 2), labels)

    def test_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="mode must be 'all', 'subset' or 'copy'"):
            DeviceAugment(flip, mode="half")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\]"):
            DeviceAugment(flip, p=2)
        with pytest.raises(TypeError, match="fn must be callable"):
            DeviceAugment(3)


def test_as_target_passes_saflex_target_through() -> None:
    t = SaflexTarget(torch.arange(2), torch.zeros(2, dtype=torch.bool))
    assert as_target(t) is t


@pytest.mark.parametrize("rows", [torch.tensor([1, 3]), torch.tensor([False, True, False, True])])
def test_chosen_subset(rows: torch.Tensor) -> None:
    x, y = torch.randn(4, 5), torch.arange(4)
    out, target = DeviceAugment(flip, mode="subset")(x, y, rows=rows)
    assert target.is_augmented.tolist() == [False, True, False, True]
    assert torch.equal(out[[0, 2]], x[[0, 2]]) and torch.equal(out[[1, 3]], x[[1, 3]].flip(-1))


def test_chosen_subset_errors() -> None:
    with pytest.raises(ValueError, match="rows applies to mode='subset' only, but mode is 'all'"):
        DeviceAugment(flip, mode="all")(torch.randn(4, 2), torch.arange(4), rows=torch.tensor([0]))
    with pytest.raises(ValueError, match="the rows mask has 3 entries for 4 rows"):
        DeviceAugment(flip)(torch.randn(4, 2), torch.arange(4), rows=torch.tensor([True, False, True]))
    with pytest.raises(TypeError, match=r"rows must be a bool mask or int indices of shape \(R,\)"):
        DeviceAugment(flip)(torch.randn(4, 2), torch.arange(4), rows=torch.tensor([0.5]))


def test_device_augment_moves_like_a_module():
    """nn.Module.to()/cuda() call self._apply(fn): the augment must not shadow it."""
    from saflex_data import DeviceAugment

    aug = DeviceAugment(lambda x: x.flip(-1), mode="all")
    assert aug.to("cpu") is aug
    assert aug.to(torch.float64) is aug
