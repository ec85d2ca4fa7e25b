"""Nothing silently wrong: one test per case of a silently wrong result (S) or a misleading error (U)."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from saflex_data import SaflexLoss, SaflexTarget
from saflex_data.functional import Rule

from .conftest import make_model

METHODS = ["last_layer", "jvp"]


def _val(n: int = 8, dtype: torch.dtype = torch.float64) -> list:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 5, generator=gen, dtype=dtype), torch.arange(n) % 4)]


def _batch(rows: int = 6, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, SaflexTarget]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 5, generator=gen, dtype=dtype)
    aug = torch.arange(rows) >= rows // 2
    return x, SaflexTarget(torch.arange(rows) % 4, aug)


@pytest.mark.parametrize("method", METHODS)
def test_s1_equal_outputs_of_two_forwards_are_not_confused(method: str) -> None:
    model = make_model("mlp")
    nn.init.zeros_(model[-1].weight), nn.init.zeros_(model[-1].bias)  # every input gives the same logits
    x, target = _batch()
    criterion = SaflexLoss(model, _val(), method=method, rule=Rule("paper", tau=None))
    reference = SaflexLoss(make_model("mlp"), _val(), method=method, rule=Rule("paper", tau=None))
    reference.model.load_state_dict(model.state_dict())
    out = model(x)
    model(torch.randn_like(x))  # a second view, equal logits
    criterion(out, target)
    reference(reference.model(x), target)
    torch.testing.assert_close(criterion.last_step["targets"], reference.last_step["targets"])
    torch.testing.assert_close(criterion.last_step["weights"], reference.last_step["weights"])


@pytest.mark.parametrize("method", METHODS)
def test_s1_a_copy_equal_to_two_forwards_raises(method: str) -> None:
    model = make_model("mlp")
    nn.init.zeros_(model[-1].weight), nn.init.zeros_(model[-1].bias)
    x, target = _batch()
    criterion = SaflexLoss(model, _val(), method=method)
    out = model(x)
    model(torch.randn_like(x))
    with pytest.raises(RuntimeError, match=r"their values equal the outputs of 2 of its last 2 forwards"):
        criterion(out.clone(), target)


@pytest.mark.parametrize("method", METHODS)
def test_s2_logits_changed_in_place_raise(method: str) -> None:
    model = make_model("mlp")
    x, target = _batch()
    criterion = SaflexLoss(model, _val(), method=method)
    out = model(x)
    out.clamp_(-0.1, 0.1)
    with pytest.raises(RuntimeError, match=r"the logits were changed in place after the forward .*version counter "
                                           r"went from \d+ to \d+"):
        criterion(out, target)
    criterion(model(x), target)  # an unchanged output: fine


def test_s5_batch_reference_without_clean_rows_keeps_everything() -> None:
    model = make_model("mlp")
    criterion = SaflexLoss(model, None, reference="batch", method="last_layer", rule=Rule("margin", beta=0.0))
    x, target = _batch()
    criterion(model(x), target)  # has clean rows: a signal is cached
    all_aug = SaflexTarget(target.labels, torch.ones(6, dtype=torch.bool))
    criterion(model(x), all_aug)
    assert torch.equal(criterion.last_step["weights"], torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("method", ["last_layer", "jvp"])
def test_s6_freezing_a_layer_between_refreshes_refreshes_the_signal(method: str) -> None:
    model = make_model("mlp")
    criterion = SaflexLoss(model, _val(), method=method, val_every=4)
    x, target = _batch()
    criterion(model(x), target)
    frozen = "2.bias" if method == "jvp" else "4.bias"
    dict(model.named_parameters())[frozen].requires_grad_(False)
    criterion(model(x), target)
    assert frozen not in criterion._signal
    # a state saved now has the signal's own shapes; a loss on the unfrozen model refuses it
    state = criterion.state_dict()
    fresh = SaflexLoss(make_model("mlp"), _val(), method=method, val_every=4)
    with pytest.raises(ValueError, match=r"the saved validation signal does not fit this model \(missing: \['"
                                         + frozen.replace(".", r"\.")):
        fresh.load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "margin", "beta": -1.0},
         r"beta for rule='margin' is a margin or bonus in \[0, inf\) \(default 1.5\)"),
        ({"name": "margin_fix", "beta": -1.0}, r"beta for rule='margin_fix' is a margin or bonus in \[0, inf\)"),
        ({"name": "paper", "beta": -0.5}, r"beta for rule='paper' is a margin or bonus in \[0, inf\)"),
        ({"name": "paper", "tau": math.inf}, r"tau must be a finite positive float \(0, inf\) or None \(argmax\), "
                                             r"but got inf"),
    ],
)
def test_s7_degenerate_rule_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rule(**kwargs)
    Rule(kwargs["name"], beta=0.0)  # the edge of the range is allowed


@pytest.mark.parametrize("method", METHODS)
def test_s8_empty_validation_batch_raises(method: str) -> None:
    model = make_model("mlp")
    val = [(torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long))]
    criterion = SaflexLoss(model, val, method=method)
    x, target = _batch()
    with pytest.raises(ValueError, match=r"val_loader yielded a batch of \(0, 5\) inputs and \(0,\) targets: every "
                                         r"validation batch needs at least one sample"):
        criterion(model(x), target)


def _trained(method: str = "last_layer") -> SaflexLoss:
    model = make_model("mlp")
    criterion = SaflexLoss(model, _val(), method=method)
    x, target = _batch()
    criterion(model(x), target)
    return criterion


def test_u1_state_has_a_version_and_0_1_states_load_or_say_where_they_came_from() -> None:
    state = _trained().state_dict()
    assert state["_extra_state"]["version"] == SaflexLoss.STATE_VERSION == 2
    # 0.1 (no version): a last_layer tuple signal is converted
    old = dict(state["_extra_state"])
    old.pop("version")
    old["signal"] = (old["signal"]["4.weight"], old["signal"]["4.bias"])
    old["signal_shapes"] = {"weight": (4, 12), "bias": (4,)}
    fresh = SaflexLoss(make_model("mlp"), _val())
    fresh.load_state_dict({"_extra_state": old})
    assert fresh.step == 1 and set(fresh._signal) == {"4.weight", "4.bias"}
    # a 0.1 jvp state whose signal is a list: named, not a KeyError / TypeError
    jvp_state = _trained("jvp").state_dict()["_extra_state"]
    jvp_state.pop("version")
    jvp_state["signal"] = list(jvp_state["signal"].values())
    with pytest.raises(ValueError, match=r"the saved validation signal \(saflex_data 0.1 \(state version 1\)\) is a "
                                         r"list, not the \{parameter name: tensor\} dict"):
        SaflexLoss(make_model("mlp"), _val(), method="jvp").load_state_dict({"_extra_state": jvp_state})
    newer = dict(state["_extra_state"], version=99)
    with pytest.raises(ValueError, match=r"the state has version 99, newer than this saflex_data reads \(<= 2\)"):
        fresh.load_state_dict({"_extra_state": newer})


@pytest.mark.parametrize("method", ["jvp", "jvp_frozen_stats", "last_layer"])
def test_u2_float64_logits_from_a_float32_model_work(method: str) -> None:
    model = make_model("mlp", dtype=torch.float32)
    criterion = SaflexLoss(model, _val(dtype=torch.float32), method=method)
    x, target = _batch(dtype=torch.float32)
    loss = criterion(model(x).double(), target)
    assert loss.dtype == torch.float64 and criterion.last_step["weights"].dtype == torch.float64
    loss.backward()


def test_u3_call_order_is_named() -> None:
    model = make_model("mlp")
    criterion = SaflexLoss(model, _val(), method="jvp")
    x, target = _batch()
    view1 = model(x)
    view2 = model(x + 1)
    criterion(view2, target)
    with pytest.raises(RuntimeError, match=r"the logits come from a forward of the model that the loss already passed "
                                           r"over: a later forward's logits went to the loss first"):
        criterion(view1, target)


@pytest.mark.parametrize(("how", "call"), [("copy.copy", copy.copy), ("copy.deepcopy", copy.deepcopy),
                                           ("pickle", pickle.dumps)])
def test_u4_copies_are_refused(how: str, call) -> None:
    criterion = _trained()
    with pytest.raises(TypeError, match=rf"SaflexLoss cannot be (copied|pickled) \({how}.*Build a new loss on the "
                                        r"copy's model"):
        call(criterion)
    copy.deepcopy(criterion.model)  # the model still copies (the hooks hold the loss weakly)


def test_u6_truncated_state_names_what_is_missing() -> None:
    criterion = _trained()
    with pytest.raises(ValueError, match=r"the saved state \(saflex_data 0.1 \(state version 1\)\) lacks "
                                         r"\['generator'\] \(it has \['step'\]\)"):
        criterion.load_state_dict({"_extra_state": {"step": 3}})
    with pytest.raises(TypeError, match=r"'_extra_state' must be a dict, but got int"):
        criterion.load_state_dict({"_extra_state": 3})


def test_u7_is_augmented_on_another_device() -> None:
    labels = torch.arange(4)
    with pytest.raises(ValueError, match=r"is_augmented is on meta but labels are on cpu"):
        SaflexTarget(labels, torch.zeros(4, dtype=torch.bool, device="meta"))
    model = make_model("mlp")
    criterion = SaflexLoss(model, _val())
    x, target = _batch()
    target.is_augmented = target.is_augmented.to("meta")
    with pytest.raises(ValueError, match=r"target.is_augmented is on meta but target.labels and the logits are on cpu"):
        criterion(model(x), target)


class _SharedBN(nn.Module):
    """One BatchNorm module called twice per forward (S3)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2, self.bn, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.lin1(x)).relu()
        return self.head(self.bn(self.lin2(h)).relu())


def _pi(method_name: str, model: nn.Module, x: torch.Tensor, aug: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    from saflex_data._autodiff import validation_gradient
    from saflex_data._methods import METHODS as PI_METHODS

    method = PI_METHODS[method_name](model)
    torch.manual_seed(3)
    out = model(x)
    capture = method.capture_of(out)
    xv, yv = _val()[0]
    model.eval()
    signal = validation_gradient(model, xv, yv)
    model.train()
    pi = method.inner_products(capture, out, aug, signal)[aug]  # every row of the batch; the augmented ones taken
    method.remove_hooks()
    return pi, capture, signal


def test_s3_a_batchnorm_called_twice_keeps_each_calls_statistics() -> None:
    from saflex_data._autodiff import fixed_batch_stats

    torch.manual_seed(0)
    model = _SharedBN().double()
    x, target = _batch(8)
    aug = target.is_augmented
    pi, capture, signal = _pi("jvp_frozen_stats", model, x, aug)
    assert isinstance(capture["bn_stats"]["bn"], list) and len(capture["bn_stats"]["bn"]) == 2
    with torch.no_grad(), fixed_batch_stats(model, capture["bn_stats"]):
        torch.testing.assert_close(model(x), capture["output"])  # each call normalised with its own statistics

    # Π = <∇θ CE_k, g> with the statistics held fixed, by central differences along g
    params = dict(model.named_parameters())
    eps = 1e-6

    def losses(sign: float) -> torch.Tensor:
        with torch.no_grad():
            for n, g in signal.items():
                params[n].add_(sign * eps * g)
            with fixed_batch_stats(model, capture["bn_stats"]):
                logp = torch.log_softmax(model(x[aug]), -1)
            for n, g in signal.items():
                params[n].sub_(sign * eps * g)
        return -logp

    expected = (losses(1.0) - losses(-1.0)) / (2 * eps)
    torch.testing.assert_close(pi, expected, rtol=1e-5, atol=1e-7)


def test_s4_frozen_stats_with_dropout_is_the_frozen_statistics_quantity() -> None:
    from saflex_data._autodiff import fixed_batch_stats, grad_inner_products
    from saflex_data._passes import set_rng_state

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 4)).double()
    x, target = _batch(8)
    aug = target.is_augmented
    frozen, capture, signal = _pi("jvp_frozen_stats", model, x, aug)
    exact, *_ = _pi("jvp", model, x, aug)
    assert capture["stochastic"]
    # the same dropout masks, the statistics held fixed: the whole batch forwarded, its augmented rows taken
    set_rng_state(capture["rng"], x.device)
    expected = grad_inner_products(model, x, signal, method="jvp", batch_stats=capture["bn_stats"])[aug]
    torch.testing.assert_close(frozen, expected)
    assert not torch.allclose(frozen, exact)  # not the exact jvp's Π (the statistics' tangent is left out)
    with torch.no_grad(), fixed_batch_stats(model, capture["bn_stats"]):
        set_rng_state(capture["rng"], x.device)
        torch.testing.assert_close(model(x), capture["output"])  # the masks were replayed


@pytest.mark.parametrize("saved", ["last_layer", "jvp"])
@pytest.mark.parametrize("method", ["last_layer", "jvp", "jvp_frozen_stats", "single_pass"])
def test_u1_real_0_1_states(saved: str, method: str) -> None:
    """tests/data/state_0_1.pt: state_dicts written by saflex_data 0.1.0 (commit c9c5a50) for this MLP."""
    from pathlib import Path

    state = torch.load(Path(__file__).parent / "data" / "state_0_1.pt", weights_only=True)[saved]
    model = make_model("mlp")
    criterion = SaflexLoss(model, _val(), method=method)
    if saved == "last_layer" and method != "last_layer":
        with pytest.raises(ValueError, match=r"\(saflex_data 0.1 \(state version 1\)\) is a tuple, not the \{parameter "
                                             rf"name: tensor\}} dict this version uses \(a 0.1 method='last_layer' "
                                             rf"state; this loss uses method='{method}'"):
            criterion.load_state_dict(state)
        return
    if saved == "jvp" and method == "last_layer":
        with pytest.raises(ValueError, match=r"does not fit this model .* the state \(saflex_data 0.1 \(state version "
                                             r"1\)\) was saved with another model, .* or another method"):
            criterion.load_state_dict(state)
        return
    criterion.load_state_dict(state)
    assert criterion.step == 1
    x, target = _batch()
    out = criterion.forward_train(x) if method == "single_pass" else model(x)
    criterion(out, target)
    assert criterion.step == 2


@pytest.mark.parametrize("method", ["last_layer", "jvp", "jvp_frozen_stats"])
def test_forwards_under_inference_mode_are_remembered_without_a_version(method: str) -> None:
    model = make_model("mlp")
    criterion = SaflexLoss(model, _val(), method=method)
    x, target = _batch()
    with torch.inference_mode():
        model(x)  # an evaluation pass between steps (timm's validate)
    criterion(model(x), target).backward()
    with torch.inference_mode():
        out = model(x)
        assert torch.isfinite(criterion(out, target))  # plain CE, no decision
    assert criterion.step == 1
