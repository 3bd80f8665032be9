"""Family-wide contract of every public dropout layer (docs/notes: the layer API table).

Each case names a layer, the module that defines it, an input shape, and how the layer is
built; wrappers get a small ``nn.Linear``. Every public layer class has a case, and a name
its module does not define is a failure, never a skip.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autodropout
import autodropout.layers
from autodropout import mc_dropout
from autodropout.layers import DropoutLayer, KeepMaskDropout

Reference = Callable[[nn.Module, nn.Module | None, torch.Tensor], torch.Tensor]


def wrapped_output(layer, wrapped, x):
    return wrapped(x)


def standout_mean(layer, wrapped, x):
    """Documented eval rule: ``pi * relu(a)``, ``pi = sigmoid(alpha a + beta)``, ``a = W x + b``."""
    a = wrapped(x)
    return torch.sigmoid(layer.alpha * a + layer.beta) * torch.relu(a)


def sparse_mean(layer, wrapped, x):
    """Documented eval rule: mean weights, those with ``log_alpha > threshold`` set to zero."""
    kept = layer.log_alpha() <= layer.threshold
    return F.linear(x, wrapped.weight * kept, wrapped.bias)


def finish_warmup(layer):
    """Put a layer with a step counter at its full rate, so that it is stochastic from call 1."""
    for name in ("step", "steps"):
        if name in layer._buffers:
            layer._buffers[name].fill_(2)


def defined(module: str, name: str) -> Any:
    """``name`` as ``autodropout.layers.<module>`` defines it; a missing one fails the test."""
    namespace = importlib.import_module(f"autodropout.layers.{module}")
    assert hasattr(namespace, name), f"autodropout.layers.{module} defines no {name}"
    return getattr(namespace, name)


@dataclass(frozen=True)
class Case:
    name: str
    module: str
    shape: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=lambda: {"p": 0.5})
    wrap: tuple[int, int] | None = None  # nn.Linear(in, out) passed as the first argument
    rate: str | None = "p"  # the drop-probability argument, None when the rate is learned
    zero: dict[str, Any] | None = field(default_factory=lambda: {"p": 0.0})
    edges: tuple[dict[str, Any], ...] = ({"p": 1e-3}, {"p": 0.999})
    reference: Reference | None = None  # eval expectation; None means the identity
    prepare: Callable[[nn.Module], None] | None = None

    def resolve(self) -> type:
        return defined(self.module, self.name)

    def build(self, **overrides) -> tuple[nn.Module, nn.Module | None]:
        cls = self.resolve()
        kwargs = {**self.kwargs, **overrides}
        wrapped = nn.Linear(*self.wrap) if self.wrap else None
        layer = cls(wrapped, **kwargs) if wrapped is not None else cls(**kwargs)
        if self.prepare is not None:
            self.prepare(layer)
        return layer, wrapped

    def input(self) -> torch.Tensor:
        return torch.randn(self.shape)

    def expected_eval(self, layer, wrapped, x) -> torch.Tensor:
        return x if self.reference is None else self.reference(layer, wrapped, x)


LINEAR = (8, 6)
CASES = [
    Case("Dropout", "standard", (16, 8)),
    Case("GaussianDropout", "standard", (16, 8)),
    Case("AlphaDropout", "standard", (16, 8)),
    Case("FeatureAlphaDropout", "standard", (8, 8, 3, 3)),
    Case("SpatialDropout", "standard", (8, 8, 3, 3), kwargs={"p": 0.5, "spatial_dims": 2}),
    Case("LockedDropout", "standard", (8, 4, 8), kwargs={"p": 0.5, "batch_first": True}),
    Case("DropConnect", "connect", (4, 8), wrap=LINEAR, reference=wrapped_output),
    Case(
        "DropBlock2d",
        "structured",
        (2, 4, 6, 6),
        kwargs={"p": 0.5, "block_size": 3, "warmup_steps": 2},
        prepare=finish_warmup,
    ),
    Case("DropPath", "structured", (64, 3)),
    Case(
        "VariationalDropout",
        "variational",
        (4, 8),
        wrap=LINEAR,
        zero=None,  # log alpha = log(p / (1 - p)) is learned: p = 0 is not a state
        edges=({"p": 1e-3}, {"p": 0.5}),
        reference=wrapped_output,
    ),
    Case(
        "SparseVariationalDropout",
        "variational",
        (4, 8),
        kwargs={"threshold": 3.0},
        wrap=LINEAR,
        rate=None,
        zero=None,
        edges=({"threshold": -20.0}, {"threshold": 20.0}),
        reference=sparse_mean,
    ),
    Case(
        "ConcreteDropout",
        "variational",
        (16, 8),
        wrap=LINEAR,
        zero=None,  # the logit of p is learned: p = 0 is not a state
        reference=wrapped_output,
    ),
    Case(
        "Standout",
        "adaptive",
        (16, 8),
        kwargs={"alpha": 1.0, "beta": 0.0},
        wrap=(8, 8),
        rate=None,
        zero=None,
        edges=({"alpha": 50.0, "beta": 0.0}, {"alpha": 1.0, "beta": -50.0}),
        reference=standout_mean,
    ),
    Case(
        "Jumpout",
        "adaptive",
        (16, 8),
        kwargs={"p_min": 0.01, "p_max": 0.6},
        rate="p_max",
        zero={"p_min": 0.0, "p_max": 0.0},
        edges=({"p_min": 0.0, "p_max": 1.0}, {"p_min": 0.5, "p_max": 0.5}),
    ),
    Case("RelevanceDropout", "adaptive", (16, 8), edges=({"p": 1e-3}, {"p": 0.95})),
    Case(
        "CurriculumDropout",
        "schedules",
        (16, 8),
        kwargs={"p": 0.5, "total_steps": 2, "schedule": "linear"},
        prepare=finish_warmup,
    ),
]
FUNCTIONS = [
    ("drop_path_rates", "structured"),
    ("variational_kl", "variational"),
    ("DropoutScheduler", "schedules"),
    ("mc_dropout", "mc"),
    ("mc_predict", "mc"),
]


ABSTRACT_BASES = (DropoutLayer, KeepMaskDropout)


def public_layer_classes() -> set[str]:
    """The ``nn.Module`` classes of ``autodropout.layers.__all__``, abstract bases excluded."""
    return {
        name
        for name in autodropout.layers.__all__
        if isinstance(obj := getattr(autodropout.layers, name), type)
        and issubclass(obj, nn.Module)
        and obj not in ABSTRACT_BASES
    }


def test_every_public_layer_has_a_case():
    assert public_layer_classes() == {case.name for case in CASES}


def test_top_level_layer_names_are_the_layers_package_exports():
    assert len(autodropout.LAYERS) == len(set(autodropout.LAYERS))
    assert set(autodropout.LAYERS) == set(autodropout.layers.__all__)


def cases(predicate: Callable[[Case], bool] = lambda case: True):
    return [pytest.param(case, id=case.name) for case in CASES if predicate(case)]


def edge_cases():
    return [
        pytest.param(case, edge, id=f"{case.name}-{'-'.join(f'{k}={v}' for k, v in edge.items())}")
        for case in CASES
        for edge in case.edges
    ]


@pytest.mark.parametrize("case", cases())
def test_eval_output_is_identity_or_documented_mean(case):
    layer, wrapped = case.build()
    layer.eval()
    x = case.input()
    output = layer(x)
    if case.reference is None:
        assert torch.equal(output, x)
    else:
        torch.testing.assert_close(output, case.expected_eval(layer, wrapped, x))
    assert torch.equal(layer(x), output)


@pytest.mark.parametrize("case", cases(lambda case: case.zero is not None))
def test_zero_rate_is_identity_in_training(case):
    layer, wrapped = case.build(**case.zero)
    x = case.input()
    output = layer(x)
    if case.reference is None:
        assert torch.equal(output, x)
    else:
        torch.testing.assert_close(output, case.expected_eval(layer, wrapped, x))


@pytest.mark.parametrize(("case", "edge"), edge_cases())
def test_edge_parameters_give_finite_outputs_and_gradients(case, edge):
    layer, _ = case.build(**edge)
    x = case.input().requires_grad_()
    output = layer(x)
    output.sum().backward()
    assert torch.isfinite(output).all()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("case", cases(lambda case: case.rate == "p"))
def test_rate_one_is_finite_or_rejected_by_name(case):
    try:
        layer, _ = case.build(p=1.0)
    except ValueError as error:
        assert re.search(r"\bp\b", str(error)), str(error)
        return
    assert torch.isfinite(layer(case.input())).all()


@pytest.mark.parametrize("case", cases())
def test_outputs_are_reproducible_under_manual_seed(case):
    x = case.input()
    outputs = []
    for _ in range(2):
        torch.manual_seed(1)
        layer, _ = case.build()
        outputs.append(layer(x))
    assert torch.equal(*outputs)


@pytest.mark.parametrize("case", cases())
def test_masks_are_fresh_across_calls(case):
    layer, _ = case.build()
    x = case.input()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("case", cases())
def test_repr_names_the_class_and_its_settings(case):
    layer, _ = case.build()
    assert layer.extra_repr()
    assert repr(layer).startswith(case.name + "(")


@pytest.mark.parametrize("case", cases(lambda case: case.rate is not None))
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_rate_out_of_range_raises_value_error_naming_it(case, value):
    with pytest.raises(ValueError, match=rf"\b{case.rate}\b"):
        case.build(**{case.rate: value})


@pytest.mark.parametrize("case", cases())
def test_layer_is_stochastic_under_mc_dropout_and_eval_afterwards(case):
    layer, _ = case.build()
    layer.eval()
    x = case.input()
    with torch.no_grad(), mc_dropout(layer):
        first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    assert not layer.training
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))


def snapshot(layer: nn.Module) -> dict[str, Any]:
    """State dict tensors and plain attributes: what a training forward could advance."""
    state = {f"state:{name}": tensor.clone() for name, tensor in layer.state_dict().items()}
    for module_name, module in layer.named_modules():
        for name, value in vars(module).items():
            if name.startswith("_") or name in ("training", "mc_sampling"):
                continue
            if isinstance(value, torch.Tensor):
                state[f"attr:{module_name}.{name}"] = value.clone()
            elif value is None or isinstance(value, (bool, int, float, str)):
                state[f"attr:{module_name}.{name}"] = value
    return state


@pytest.mark.parametrize("case", cases())
def test_mc_dropout_sampling_leaves_the_layer_state_unchanged(case):
    layer, _ = case.build()
    x = case.input()
    with torch.no_grad():
        layer(x)  # one training forward: lazily sized state exists
    layer.eval()
    before = snapshot(layer)
    with torch.no_grad(), mc_dropout(layer):
        for _ in range(3):
            layer(x)
    after = snapshot(layer)
    assert before.keys() == after.keys()
    changed = [
        key
        for key, value in before.items()
        if not (
            torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else value == after[key]
        )
    ]
    assert not changed, f"advanced under mc_dropout (check layer.updates_state): {changed}"


DROP_PROBABILITY = re.compile(r"\*?drop\*?\s+probability|probability of (dropping|zeroing)", re.I)


@pytest.mark.parametrize("case", cases())
def test_layer_is_exported_with_a_docstring_about_the_drop_probability(case):
    cls = case.resolve()
    assert getattr(autodropout, case.name, None) is cls, f"autodropout.{case.name} is not exported"
    assert case.name in autodropout.__all__
    assert DROP_PROBABILITY.search(cls.__doc__ or ""), f"{case.name} docstring: no drop probability"


@pytest.mark.parametrize(("name", "module"), FUNCTIONS, ids=[name for name, _ in FUNCTIONS])
def test_helper_is_exported_with_a_docstring(name, module):
    helper = getattr(autodropout, name, None)
    assert helper is defined(module, name) and name in autodropout.__all__, (
        f"autodropout.{name} not exported"
    )
    assert helper.__doc__ and helper.__doc__.strip()
