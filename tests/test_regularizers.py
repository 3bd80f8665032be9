"""Baseline references: every form parses, errors name the REF, and each baseline puts the
intended layer at the intended place of the WRN or the GPT (and nowhere else)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autodropout.errors import BadInput
from autodropout.layers import DropBlock2d, DropPath, GaussianDropout, Jumpout, SpatialDropout
from workers.baselines import BASELINE_FORMS, Baseline, check_model, parse_regularizer
from workers.datasets import Images, synthetic_images
from workers.final import check_fits, summarize, training_subset
from workers.models import GPTLanguageModel, WideBlock, WideResNet
from workers.regularizers import apply_baseline


@pytest.mark.parametrize(("ref", "expected", "canonical"), [
    ("none", Baseline("none"), "none"),
    ("NONE", Baseline("none"), "none"),
    ("dropout:0.3", Baseline("dropout", 0.3), "dropout:0.3"),
    ("dropout:0.30", Baseline("dropout", 0.3), "dropout:0.3"),
    ("spatial:0.2", Baseline("spatial", 0.2), "spatial:0.2"),
    ("dropblock:0.1:3", Baseline("dropblock", 0.1, 3), "dropblock:0.1:3"),
    ("dropblock:0.1", Baseline("dropblock", 0.1, 7), "dropblock:0.1:7"),
    ("droppath:0.1", Baseline("droppath", 0.1), "droppath:0.1"),
    ("gaussian:0.25", Baseline("gaussian", 0.25), "gaussian:0.25"),
    ("jumpout", Baseline("jumpout", 0.6), "jumpout:0.6"),
    ("jumpout:0.4", Baseline("jumpout", 0.4), "jumpout:0.4"),
    (" dropout:0 ", Baseline("dropout", 0.0), "dropout:0"),
])
def test_every_baseline_form_parses_to_its_canonical_ref(ref, expected, canonical):
    baseline = parse_regularizer(ref)
    assert baseline == expected
    assert str(baseline) == canonical
    assert parse_regularizer(canonical) == baseline


@pytest.mark.parametrize("ref", ["wrn-fashion-best", "42", "3fa2b9c1", "pattern.json",
                                 "exported.YAML", "dir/p.yml"])
def test_pattern_references_are_not_baselines(ref):
    assert parse_regularizer(ref) is None


def test_an_existing_file_is_a_pattern_reference_even_without_a_suffix(tmp_path):
    path = tmp_path / "dropout:0.3"
    path.write_text("{}")
    assert parse_regularizer(str(path)) is None


def test_an_unknown_name_lists_the_valid_forms():
    with pytest.raises(BadInput) as error:
        parse_regularizer("dropconnect:0.2")
    message = str(error.value)
    assert "'dropconnect:0.2'" in message and "unknown name 'dropconnect'" in message
    assert all(form in message for form in BASELINE_FORMS)


@pytest.mark.parametrize(("ref", "problem"), [
    ("dropout", "expected dropout:P"),
    ("dropout:", "P must be a number, got ''"),
    ("dropout:abc", "P must be a number, got 'abc'"),
    ("dropout:1.5", "P must be a probability in [0, 1]"),
    ("spatial:-0.1", "P must be a probability in [0, 1]"),
    ("gaussian:nan", "P must be a probability in [0, 1]"),
    ("droppath:inf", "P must be a probability in [0, 1]"),
    ("dropout:0.1:2", "expected dropout:P"),
    ("none:0.1", "expected none, without arguments"),
    ("dropblock:0.1:0", "SIZE must be a positive integer, got '0'"),
    ("dropblock:0.1:2.5", "SIZE must be a positive integer, got '2.5'"),
    ("dropblock:0.1:3:3", "expected dropblock:P[:SIZE]"),
    ("jumpout:x", "PMAX must be a number"),
    ("jumpout:0.1:0.2", "expected jumpout[:PMAX]"),
])
def test_malformed_numbers_name_the_ref(ref, problem):
    with pytest.raises(BadInput) as error:
        parse_regularizer(ref)
    assert f"regularizer {ref!r}" in str(error.value)
    assert problem in str(error.value)


def test_baseline_refuses_bad_fields():
    with pytest.raises(ValueError, match="family must be one of"):
        Baseline("dropconnect", 0.1)
    with pytest.raises(ValueError, match="p must be a probability"):
        Baseline("dropout", 1.5)
    with pytest.raises(ValueError, match="block_size must be given for dropblock"):
        Baseline("dropblock", 0.1)


# -- placement in the Wide ResNet ------------------------------------------------------------
def wrn(depth: int = 10, **kwargs) -> WideResNet:
    torch.manual_seed(0)
    return WideResNet(depth=depth, **kwargs)


def blocks(model: nn.Module) -> list[tuple[str, WideBlock]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WideBlock)]


def test_dropout_is_the_in_block_dropout_of_zagoruyko_and_komodakis():
    model = wrn()
    changed = apply_baseline(model, Baseline("dropout", 0.3))
    assert changed == [f"{name}.dropout" for name, _ in blocks(model)]
    assert repr(model) == repr(wrn(dropout=0.3))
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3] * 3


FEATURE_LAYERS = [
    (Baseline("spatial", 0.2), SpatialDropout),
    (Baseline("dropblock", 0.1, 3), DropBlock2d),
    (Baseline("gaussian", 0.2), GaussianDropout),
    (Baseline("jumpout", 0.4), Jumpout),
]


@pytest.mark.parametrize(("baseline", "layer_type"), FEATURE_LAYERS)
def test_feature_baselines_follow_every_block_batchnorm(baseline, layer_type):
    model = wrn(depth=16)  # two blocks per group: identity and projection shortcuts
    changed = apply_baseline(model, baseline)
    names = [f"{name}.{bn}" for name, _ in blocks(model) for bn in ("bn1", "bn2")]
    assert changed == names and len(names) == 12
    for name in names:
        norm, layer = model.get_submodule(name)
        assert isinstance(norm, nn.BatchNorm2d) and type(layer) is layer_type
        assert getattr(layer, "p_max" if layer_type is Jumpout else "p") == baseline.p
    assert type(model.bn) is nn.BatchNorm2d  # the head's BatchNorm is no pattern site either
    added = [m for m in model.modules() if isinstance(m, layer_type)]
    assert len(added) == 12
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))


@pytest.mark.parametrize(("baseline", "layer_type"), FEATURE_LAYERS)
def test_feature_layers_see_the_batchnorm_output_in_training(baseline, layer_type):
    model = wrn()
    apply_baseline(model, baseline)
    seen = []
    for name, _ in blocks(model):
        norm, layer = model.get_submodule(f"{name}.bn1")
        norm.register_forward_hook(lambda m, i, out: seen.append(("bn", out)))
        layer.register_forward_hook(lambda m, i, out: seen.append(("layer", i[0])))
    model.train()(torch.randn(2, 1, 28, 28))
    assert [kind for kind, _ in seen] == ["bn", "layer"] * 3
    assert all(seen[i][1] is seen[i + 1][1] for i in range(0, 6, 2))


@pytest.mark.parametrize("baseline", [Baseline("none"), Baseline("dropout", 0.5),
                                      Baseline("droppath", 0.5),
                                      *(b for b, _ in FEATURE_LAYERS)])
def test_eval_output_is_the_plain_model_output(baseline):
    plain, model = wrn(), wrn()
    apply_baseline(model, baseline)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))


def test_droppath_drops_residual_branches_with_the_linear_depth_rule():
    model = wrn(depth=16)
    changed = apply_baseline(model, Baseline("droppath", 0.3))
    assert changed == [f"{name}.conv2" for name, _ in blocks(model)]
    rates = []
    for name in changed:
        conv, drop = model.get_submodule(name)
        assert isinstance(conv, nn.Conv2d) and type(drop) is DropPath
        rates.append(drop.p)
    assert rates == pytest.approx([0.3 * block / 6 for block in range(1, 7)])


def test_droppath_branch_output_is_whole_samples_dropped_or_kept():
    model = wrn()
    apply_baseline(model, Baseline("droppath", 1.0))  # the last block always drops its branch
    block = model.group3[0]
    outputs = []
    block.conv2.register_forward_hook(lambda m, i, out: outputs.append(out))
    model.train()(torch.randn(3, 1, 28, 28))
    assert torch.count_nonzero(outputs[0]) == 0


def test_none_changes_nothing():
    model = wrn()
    assert apply_baseline(model, Baseline("none")) == []
    assert repr(model) == repr(wrn())


# -- the GPT language model ------------------------------------------------------------------
def gpt() -> GPTLanguageModel:
    torch.manual_seed(0)
    return GPTLanguageModel(32, context=8, d_model=16, n_layers=2, n_heads=2)


SLOTS = ["transformer.drop"] + [
    f"transformer.h.{i}.{slot}" for i in range(2)
    for slot in ("attn.attn_dropout", "attn.resid_dropout", "mlp.hidden_dropout", "mlp.dropout")
]


def test_gpt_dropout_sets_every_dropout_slot():
    model = gpt()
    assert apply_baseline(model, Baseline("dropout", 0.2)) == SLOTS
    assert [model.get_submodule(name).p for name in SLOTS] == [0.2] * len(SLOTS)
    torch.manual_seed(0)
    assert repr(model) == repr(GPTLanguageModel(32, context=8, d_model=16, n_layers=2,
                                                n_heads=2, dropout=0.2))


def test_gpt_gaussian_replaces_every_dropout_slot():
    model = gpt()
    assert apply_baseline(model, Baseline("gaussian", 0.2)) == SLOTS
    assert all(type(model.get_submodule(name)) is GaussianDropout for name in SLOTS)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize("baseline", [Baseline("spatial", 0.1), Baseline("dropblock", 0.1, 3),
                                      Baseline("droppath", 0.1), Baseline("jumpout", 0.6)])
def test_convnet_baselines_are_refused_for_the_gpt(baseline):
    with pytest.raises(BadInput, match=f"regularizer {baseline}: .* the gpt model takes none"):
        apply_baseline(gpt(), baseline)
    with pytest.raises(BadInput, match="the gpt model takes"):
        check_model(baseline, "gpt")
    check_model(baseline, "wide_resnet")


def test_other_models_are_refused():
    with pytest.raises(BadInput, match="not Sequential"):
        apply_baseline(nn.Sequential(nn.Linear(2, 2)), Baseline("dropout", 0.1))


# -- helpers of workers.final ----------------------------------------------------------------
def test_check_fits_names_the_ref_of_a_block_larger_than_a_map():
    model = wrn()
    apply_baseline(model, Baseline("dropblock", 0.1, 8))  # the last stage is 7x7
    images = synthetic_images(2)
    with pytest.raises(BadInput, match=r"regularizer dropblock:0.1:8: DropBlock2d: block_size=8"):
        check_fits(model, images, "dropblock:0.1:8")
    assert model.training  # left as it was
    model = wrn()
    apply_baseline(model, Baseline("dropblock", 0.1, 7))
    check_fits(model, images, "dropblock:0.1:7")
    assert all(int(m.steps) == 0 for m in model.modules() if isinstance(m, DropBlock2d))


def test_training_subset_is_all_or_a_seeded_subset():
    images = synthetic_images(64)
    assert training_subset(images, None) is images
    subset = training_subset(images, 16, seed=3)
    assert isinstance(subset, Images) and len(subset) == 16
    assert torch.equal(subset.labels, training_subset(images, 16, seed=3).labels)
    tokens = torch.arange(100)
    assert torch.equal(training_subset(tokens, 10), torch.arange(10))
    with pytest.raises(ValueError, match="examples must be an integer in"):
        training_subset(images, 65)


def test_summarize_gives_mean_and_sample_std():
    mean, std = summarize([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == 1.0
    mean, std = summarize([0.5])
    assert mean == 0.5 and std != std


def test_parsing_baselines_loads_no_torch():
    import subprocess
    import sys

    code = ("import sys, workers.baselines as b; b.parse_regularizer('dropblock:0.1:3'); "
            "b.Baseline('jumpout', 0.6); print(','.join(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
