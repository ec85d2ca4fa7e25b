"""Class-index labels of every integer dtype behave like int64 ones, in every path; SaflexTarget.to and indexing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from saflex_data import SaflexCollate, SaflexLoss
from saflex_data.batch import SaflexTarget
from saflex_data.mixing import MixUp

from .conftest import make_model

INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]
NUMPY_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8]


def _problem(dtype: torch.dtype, **kwargs):
    """A fresh model + SaflexLoss whose validation labels and training labels have ``dtype``."""
    model = make_model("mlp", num_classes=3)
    gen = torch.Generator().manual_seed(1)
    vx, vy = torch.randn(12, 5, dtype=torch.float64, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    criterion = SaflexLoss(model, DataLoader(TensorDataset(vx, vy.to(dtype)), batch_size=6), **kwargs)
    x = torch.randn(8, 5, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 3, (8,), generator=gen).to(dtype)
    aug = torch.tensor([False, True, True, False, True, True, False, True])
    return model, criterion, x, labels, aug


def _loss_and_grads(dtype: torch.dtype, path: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model, criterion, x, labels, aug = _problem(dtype, **({"enabled": False} if path == "disabled" else {}))
    if path == "num_splits":
        criterion.num_splits = 2
        target: SaflexTarget | torch.Tensor = labels
    else:
        target = SaflexTarget(labels, aug)
    if path == "no_grad":
        with torch.no_grad():
            return criterion(model(x), target), []
    loss = criterion(model(x), target)
    return loss.detach(), list(torch.autograd.grad(loss, list(model.parameters())))


class TestLossPaths:
    @pytest.mark.parametrize("path", ["train", "no_grad", "disabled", "num_splits"])
    @pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
    def test_same_loss_and_grads_as_int64(self, dtype: torch.dtype, path: str, one_thread: None) -> None:
        ref_loss, ref_grads = _loss_and_grads(torch.int64, path)
        loss, grads = _loss_and_grads(dtype, path)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        for g, r in zip(grads, ref_grads, strict=False):
            torch.testing.assert_close(g, r, rtol=0, atol=0)

    @pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
    def test_disabled_is_plain_cross_entropy(self, dtype: torch.dtype) -> None:
        model, criterion, x, labels, aug = _problem(dtype, enabled=False)
        logits = model(x)
        expected = F.cross_entropy(logits, labels.long())
        torch.testing.assert_close(criterion(logits, SaflexTarget(labels, aug)), expected, rtol=0, atol=0)


class TestSaflexTargetDtypes:
    @pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
    def test_soft_labels_index_and_cat(self, dtype: torch.dtype) -> None:
        labels = torch.tensor([2, 0, 1, 2])
        aug = torch.tensor([True, False, True, False])
        ref = SaflexTarget(labels, aug)
        target = SaflexTarget(labels.to(dtype), aug)
        torch.testing.assert_close(target.soft_labels(3), ref.soft_labels(3))
        assert target[1].labels.tolist() == [0] and target[1].labels.dtype == dtype
        both = SaflexTarget.cat([target, ref])
        assert both.labels.tolist() == labels.tolist() * 2

    @pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
    def test_mixup_of_int_labels(self, dtype: torch.dtype) -> None:
        x = torch.randn(6, 3, 4, 4)
        labels = torch.tensor([0, 1, 2, 0, 1, 2])
        mix = MixUp(num_classes=3, generator=torch.Generator().manual_seed(0))
        _, ref = mix(x, SaflexTarget(labels, torch.zeros(6, dtype=torch.bool)))
        mix = MixUp(num_classes=3, generator=torch.Generator().manual_seed(0))
        _, got = mix(x, SaflexTarget(labels.to(dtype), torch.zeros(6, dtype=torch.bool)))
        torch.testing.assert_close(got.labels, ref.labels, rtol=0, atol=0)


class TestCollateDtypes:
    @pytest.mark.parametrize(
        "make",
        [lambda d: torch.tensor(2, dtype=d), lambda d: torch.tensor([2], dtype=d)],
        ids=["0d", "1d-one"],
    )
    @pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
    def test_tensor_labels_become_int64(self, dtype: torch.dtype, make) -> None:
        batch = [(torch.randn(3), make(dtype)) for _ in range(4)]
        _, target = SaflexCollate(p=0.5, seed=0)(batch)
        assert target.labels.dtype == torch.int64 and target.labels.tolist() == [2, 2, 2, 2]

    @pytest.mark.parametrize("np_dtype", NUMPY_DTYPES)
    def test_numpy_labels_become_int64(self, np_dtype) -> None:
        batch = [(torch.randn(3), np_dtype(1)) for _ in range(2)] + [(torch.randn(3), np.array([2], dtype=np_dtype))]
        _, target = SaflexCollate(p=0.5, seed=0)(batch)
        assert target.labels.dtype == torch.int64 and target.labels.tolist() == [1, 1, 2]

    def test_two_element_label_is_still_an_error(self) -> None:
        with pytest.raises(TypeError, match="must be an int class index or a 1-D float tensor"):
            SaflexCollate(p=0.5)([(torch.randn(3), torch.tensor([1, 2]))])


class TestSaflexTargetTo:
    def _target(self, soft: bool = False) -> SaflexTarget:
        labels = torch.tensor([[0.25, 0.75], [1.0, 0.0]]) if soft else torch.tensor([1, 0], dtype=torch.int32)
        return SaflexTarget(labels, torch.tensor([True, False]), torch.tensor([4, 5]), torch.tensor([0, -1]), ("a",))

    def test_to_other_tensor_takes_device_and_float_dtype(self) -> None:
        soft = self._target(soft=True).to(torch.zeros(1, dtype=torch.float64))
        assert soft.labels.dtype == torch.float64 and soft.is_augmented.dtype == torch.bool
        assert soft.index.dtype == torch.int64 and soft.op.dtype == torch.int64 and soft.op_names == ("a",)
        hard = self._target().to(torch.zeros(1, dtype=torch.float64))
        assert hard.labels.dtype == torch.int32 and hard.is_augmented.dtype == torch.bool

    def test_to_uint8_images_only_moves(self) -> None:
        target = self._target(soft=True)
        assert target.to(torch.zeros(1, dtype=torch.uint8)) == target

    def test_device_and_dtype(self) -> None:
        out = self._target(soft=True).to("cpu", torch.float16, non_blocking=True)
        assert out.labels.dtype == torch.float16 and out.device == torch.device("cpu")
        out = self._target(soft=True).to(device="cpu", dtype=torch.bfloat16)
        assert out.labels.dtype == torch.bfloat16
        assert self._target().to(torch.float16).labels.dtype == torch.int32  # hard labels keep theirs
        assert self._target(soft=True).to(torch.int64).labels.dtype == torch.float32  # non-float dtype: no change

    def test_copy(self) -> None:
        target = self._target()
        assert target.to("cpu").labels.data_ptr() == target.labels.data_ptr()
        copied = target.to("cpu", copy=True)
        assert copied == target and copied.labels.data_ptr() != target.labels.data_ptr()

    def test_bad_arguments(self) -> None:
        with pytest.raises(TypeError, match=r"SaflexTarget.to takes Tensor.to's arguments .* but got \('nowhere'\)"):
            self._target().to("nowhere")
        with pytest.raises(TypeError, match=r"but got \(3, colour='red'\)"):
            self._target().to(3, colour="red")


class TestSaflexTargetIndexing:
    def _target(self) -> SaflexTarget:
        return SaflexTarget(torch.tensor([3, 1, 2]), torch.tensor([False, True, True]), torch.tensor([7, 8, 9]))

    @pytest.mark.parametrize("item", [1, -2, np.int64(1), torch.tensor(1), torch.tensor(1, dtype=torch.int32)])
    def test_integer_gives_one_sample(self, item) -> None:
        one = self._target()[item]
        assert len(one) == 1 and one.labels.tolist() == [1] and one.is_augmented.tolist() == [True]
        assert one.index.tolist() == [8]

    def test_slice_mask_and_indices_still_work(self) -> None:
        target = self._target()
        assert target[1:].labels.tolist() == [1, 2]
        assert target[target.is_augmented].labels.tolist() == [1, 2]
        assert target[torch.tensor([2, 0])].labels.tolist() == [2, 3]
        assert target[[0]].labels.tolist() == [3]

    @pytest.mark.parametrize("item", [3, -4])
    def test_out_of_range(self, item: int) -> None:
        with pytest.raises(IndexError, match=f"index {item} is out of range for a SaflexTarget of 3 samples"):
            self._target()[item]
