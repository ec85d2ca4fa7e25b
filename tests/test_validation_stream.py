"""Validation batches in every shape a loader yields them, and the errors when a batch cannot be used."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from saflex_data import SaflexLoss
from saflex_data._stream import INPUT_KEYS, TARGET_KEYS, ValidationStream
from saflex_data.batch import SaflexTarget
from saflex_data.contrastive import SaflexContrastiveLoss

from .conftest import make_model
from .test_contrastive import PROMPTS, _problem


def _val_pairs() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(6, 5, dtype=torch.float64, generator=gen), torch.randint(0, 3, (6,), generator=gen))
            for _ in range(2)]


def _step(val_loader, **kwargs) -> Tensor:
    model = make_model("mlp", num_classes=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 5, dtype=torch.float64, generator=gen)
    target = SaflexTarget(torch.randint(0, 3, (8,), generator=gen), torch.arange(8) % 2 == 1)
    criterion = SaflexLoss(model, val_loader, **kwargs)
    return torch.stack([criterion(model(x), target).detach() for _ in range(3)])


class _Batch(NamedTuple):
    inputs: Tensor
    targets: Tensor
    is_augmented: Tensor


class TestAcceptedBatches:
    @pytest.mark.parametrize(
        "wrap, kwargs",
        [
            (lambda x, y: [x, y], {}),
            (lambda x, y: (x, y, torch.arange(len(y))), {}),
            (lambda x, y: (x, y, "meta", {"id": 1}), {}),
            (lambda x, y: _Batch(x, y, torch.zeros(len(y), dtype=torch.bool)), {}),
            (lambda x, y: (x, SaflexTarget(y, torch.zeros(len(y), dtype=torch.bool))), {}),
            (lambda x, y: {"pixel_values": x, "labels": y, "id": 3}, {}),
            (lambda x, y: {"img": x, "cls": y}, {"val_keys": ("img", "cls")}),
            (lambda x, y: {"image": x, "label": y, "img": x * 0, "cls": y * 0}, {"val_keys": ("image", "label")}),
        ],
        ids=["list", "extra", "two-extras", "namedtuple", "saflex-target", "hf-dict", "val-keys", "val-keys-first"],
    )
    def test_same_steps_as_plain_pairs(self, wrap, kwargs, one_thread: None) -> None:
        pairs = _val_pairs()
        torch.testing.assert_close(_step([wrap(x, y) for x, y in pairs], **kwargs), _step(pairs), rtol=0, atol=0)

    @pytest.mark.parametrize("input_key, target_key", list(itertools.product(INPUT_KEYS, TARGET_KEYS)))
    def test_every_common_name(self, input_key: str, target_key: str) -> None:
        x, y = torch.randn(2, 3), torch.tensor([0, 1])
        stream = ValidationStream([{target_key: y, input_key: x, "other": 1}], "SaflexLoss")
        got_x, got_y = stream.next(torch.device("cpu"))
        assert got_x is x and got_y is y

    def test_common_names_in_order(self) -> None:
        x, y = torch.randn(2, 3), torch.tensor([0, 1])
        stream = ValidationStream([{"inputs": x * 0, "image": x, "y": y * 0, "label": y}], "SaflexLoss")
        got_x, got_y = stream.next(torch.device("cpu"))
        assert got_x is x and got_y is y

    def test_contrastive_takes_val_keys(self) -> None:
        towers, images, texts, is_augmented, val = _problem(seed=0)
        ref = SaflexContrastiveLoss(towers, [val], PROMPTS)(images, texts, is_augmented)
        towers, images, texts, is_augmented, val = _problem(seed=0)
        loss = SaflexContrastiveLoss(towers, [{"px": val[0], "cls": val[1]}], PROMPTS, val_keys=("px", "cls"))
        torch.testing.assert_close(loss(images, texts, is_augmented), ref, rtol=0, atol=0)


class TestErrors:
    def test_dict_without_known_names(self) -> None:
        model = make_model("mlp", num_classes=3)
        x, y = _val_pairs()[0]
        criterion = SaflexLoss(model, [{"feats": x, "labels": y}])
        with pytest.raises(
            ValueError,
            match=r"val_loader yielded a dict with keys \['feats', 'labels'\], but no input key among \('image', "
            r"'images', 'input', 'inputs', 'pixel_values', 'x'\); name them with SaflexLoss\(\.\.\., "
            r"val_keys=\(input_key, target_key\)\)",
        ):
            criterion(model(x), SaflexTarget(y, torch.ones(6, dtype=torch.bool)))

    def test_dict_without_target_name(self) -> None:
        stream = ValidationStream([{"x": torch.zeros(1), "cls": torch.zeros(1)}], "SaflexContrastiveLoss")
        with pytest.raises(
            ValueError,
            match=r"keys \['x', 'cls'\], but no target key among \('label', 'labels', 'target', 'targets', 'y'\); "
            r"name them with SaflexContrastiveLoss\(\.\.\., val_keys=",
        ):
            stream.next(torch.device("cpu"))

    def test_val_keys_missing_from_the_batch(self) -> None:
        stream = ValidationStream([{"image": torch.zeros(1), "label": torch.zeros(1)}], "SaflexLoss", ("img", "label"))
        with pytest.raises(
            ValueError,
            match=r"val_loader yielded a dict without the key\(s\) \['img'\] named by val_keys=\('img', 'label'\); "
            r"its keys are \['image', 'label'\]",
        ):
            stream.next(torch.device("cpu"))

    @pytest.mark.parametrize("keys", ["image", ("image",), ("a", "b", "c"), (0, 1)])
    def test_bad_val_keys(self, keys) -> None:
        with pytest.raises(TypeError, match=r"val_keys must be None or a pair of dict keys \(input_key, target_key\)"):
            SaflexLoss(make_model("mlp"), _val_pairs(), val_keys=keys)

    @pytest.mark.parametrize("batch, got", [(torch.zeros(3), "Tensor"), ((torch.zeros(3),), "tuple of length 1")])
    def test_not_a_pair(self, batch, got: str) -> None:
        stream = ValidationStream([batch], "SaflexLoss")
        with pytest.raises(
            TypeError,
            match=rf"val_loader must yield \(inputs, targets\) pairs, but it yielded {got}; \(inputs, targets, "
            r"\*extra\) tuples and dicts \(read through val_keys=\) work too",
        ):
            stream.next(torch.device("cpu"))

    def test_exhausted_one_shot_iterator(self) -> None:
        stream = ValidationStream(iter(_val_pairs()), "SaflexLoss")
        stream.next(torch.device("cpu"))
        stream.next(torch.device("cpu"))
        with pytest.raises(
            ValueError,
            match=r"val_loader is a one-shot iterator \(list_iterator\) and it has run out after 2 batches: "
            r"SaflexLoss draws validation batches for the whole run, so pass something it can iterate again \(a "
            r"DataLoader, a list of batches\), or itertools.cycle\(\.\.\.\) around the iterator",
        ):
            stream.next(torch.device("cpu"))

    def test_generator_too(self) -> None:
        stream = ValidationStream((b for b in _val_pairs()[:1]), "SaflexContrastiveLoss")
        stream.next(torch.device("cpu"))
        with pytest.raises(ValueError, match=r"one-shot iterator \(generator\) and it has run out after 1 batches"):
            stream.next(torch.device("cpu"))

    def test_a_loader_is_cycled_and_cycle_works(self) -> None:
        pairs = _val_pairs()
        for loader in (DataLoader(TensorDataset(*pairs[0]), batch_size=3), itertools.cycle(iter(pairs))):
            stream = ValidationStream(loader, "SaflexLoss")
            for _ in range(5):
                stream.next(torch.device("cpu"))


class TestModelCannotTakeTheBatch:
    _match = (
        r"SaflexLoss: the model failed on a validation batch from val_loader \(inputs of shape {shape}, dtype "
        r"{dtype}, on cpu\): .*\nThe validation inputs must look like the training inputs \(dtype, feature size, "
        r"normalisation, memory format\): fix val_loader, or pass SaflexLoss\(\.\.\., prepare=fn\), which is applied "
        r"to each validation batch after the move to the model's device\."
    )

    def _criterion(self, val, method: str, **kwargs):
        model = make_model("mlp", num_classes=3)
        criterion = SaflexLoss(model, val, method=method, **kwargs)
        x = torch.randn(4, 5, dtype=torch.float64)
        return lambda: criterion(model(x), SaflexTarget(torch.tensor([0, 1, 2, 0]), torch.ones(4, dtype=torch.bool)))

    @pytest.mark.parametrize("method", ["last_layer", "jvp"])
    def test_dtype(self, method: str) -> None:
        val = [(torch.randn(6, 5), torch.randint(0, 3, (6,)))]  # float32 against a float64 model
        with pytest.raises(RuntimeError, match=self._match.format(shape=r"\(6, 5\)", dtype="torch.float32")) as info:
            self._criterion(val, method)()
        assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error stays attached
        self._criterion(val, method, prepare=lambda x: x.double())()  # the fix the message names

    @pytest.mark.parametrize("method", ["last_layer", "jvp"])
    def test_feature_size(self, method: str) -> None:
        val = [(torch.randn(6, 7, dtype=torch.float64), torch.randint(0, 3, (6,)))]
        with pytest.raises(RuntimeError, match=self._match.format(shape=r"\(6, 7\)", dtype="torch.float64")):
            self._criterion(val, method)()

    def test_contrastive(self) -> None:
        towers, images, texts, is_augmented, val = _problem(seed=0)
        loss = SaflexContrastiveLoss(towers, [(val[0].float(), val[1])], PROMPTS)  # float32 vs float64 towers
        with pytest.raises(RuntimeError, match=r"SaflexContrastiveLoss: the model failed on a validation batch"):
            loss(images, texts, is_augmented)

    def test_other_errors_pass_unchanged(self) -> None:
        class Broken(nn.Module):
            def forward(self, x: Tensor) -> Tensor:
                raise RuntimeError("my own bug")

        stream = ValidationStream([], "SaflexLoss")
        with pytest.raises(RuntimeError, match="my own bug") as info, stream.model_call(torch.zeros(1)):
            Broken()(torch.zeros(1))
        assert "validation batch" in str(info.value)  # wrapped, with the original message kept
        with pytest.raises(ValueError, match="^not a torch error$"), stream.model_call(torch.zeros(1)):
            raise ValueError("not a torch error")
