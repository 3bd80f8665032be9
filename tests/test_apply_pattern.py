"""apply_pattern / strip_pattern: site selection, residual masks, exact restore, eval, training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision_blocks import BasicBlock, Bottleneck

import autodropout as ad
from autodropout.patterns import SUBLAYERS
from workers.models import GPTLanguageModel, WideResNet

VOCAB = 13


class TinyResNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8))
        downsample = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.layer2 = nn.Sequential(Bottleneck(8, 4, stride=2, downsample=downsample))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))


RESNET_BNS = ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1", "layer2.0.bn2",
              "layer2.0.bn3", "layer2.0.downsample.1"]


# -- patterns --------------------------------------------------------------------------------
def conv_site(**overrides):
    site = dict(size_h=2, size_w=2, stride=4, repeat="fill", rotate=0.0, shear_x=0.0,
                shear_y=0.0, share_c=True, residual=False)
    site.update(overrides)
    return site


def conv_pattern(n_sites=1, **overrides):
    return ad.Pattern("conv", [conv_site(**overrides)] * n_sites)


def sequence_site(apply_to, **overrides):
    site = dict(size=2, stride=4, repeat="fill", axis="tokens", share=True, apply_to=apply_to)
    site.update(overrides)
    return site


def sequence_pattern(apply_to=tuple(SUBLAYERS), n_sites=1):
    return ad.Pattern("sequence", [sequence_site(list(apply_to))] * n_sites)


def small_gpt():
    return GPTLanguageModel(VOCAB, context=16, d_model=32, n_layers=2, n_heads=4)


def images(n=4, channels=3, size=8):
    return torch.randn(n, channels, size, size)


def tokens(n=3, t=16):
    return torch.randint(0, VOCAB, (n, t))


CASES = {
    "resnet": (TinyResNet, images, lambda: conv_pattern(residual=True)),
    "wide_resnet": (lambda: WideResNet(depth=10, width=1), lambda: images(channels=1, size=12),
                    lambda: conv_pattern(residual=True)),
    "gpt": (small_gpt, tokens, sequence_pattern),
}


def seeded(model, x, seed=1):
    torch.manual_seed(seed)
    return model(x)


# -- selection ---------------------------------------------------------------------------------
def test_conv_default_sites_are_every_batchnorm_in_order():
    model = TinyResNet()
    handle = ad.apply_pattern(model, conv_pattern())
    assert handle.module_names == RESNET_BNS
    wide = WideResNet(depth=10, width=1)
    expected = [n for n, m in wide.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert ad.apply_pattern(wide, conv_pattern()).module_names == expected
    assert len(expected) == 7


def test_glob_type_and_list_selectors():
    model = TinyResNet()
    assert ad.apply_pattern(model, conv_pattern(), sites="layer*.bn2").module_names == [
        "layer1.0.bn2", "layer2.0.bn2"]
    assert ad.apply_pattern(model, conv_pattern(), sites=nn.Conv2d).module_names == [
        "conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2",
        "layer2.0.conv3", "layer2.0.downsample.0"]
    names = ad.apply_pattern(model, conv_pattern(), sites=["bn1", "layer2.0.downsample.*"])
    assert names.module_names == ["bn1", "layer2.0.downsample.0", "layer2.0.downsample.1"]


def test_layers_added_by_a_pattern_are_never_selected():
    model = TinyResNet()
    ad.apply_pattern(model, conv_pattern(residual=True))
    assert ad.apply_pattern(model, conv_pattern()).module_names == RESNET_BNS
    with pytest.raises(ValueError, match="selector '\\*autodropout\\*' matches no module"):
        ad.apply_pattern(model, conv_pattern(), sites="*autodropout*")
    with pytest.raises(ValueError, match="selector PatternDropout matches no module"):
        ad.apply_pattern(model, conv_pattern(), sites=ad.PatternDropout)


def test_containers_cannot_be_sites():
    with pytest.raises(ValueError, match="layer2.0.downsample is a Sequential"):
        ad.apply_pattern(TinyResNet(), conv_pattern(), sites="layer2.0.downsample")


def test_a_sequential_model_keeps_running_its_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    handle = ad.apply_pattern(model, conv_pattern())
    assert handle.module_names == ["1"] and len(model) == 3
    model.eval()
    assert model(images()).shape == (4, 4, 8, 8)


def test_site_count_mismatch_names_both_counts_and_some_modules():
    model = TinyResNet()
    ad.apply_pattern(model, conv_pattern(n_sites=3))  # mapped by stages on the first forward
    with pytest.raises(ValueError, match=r"3 sites but 7 modules matched in 2 stages .*"
                                         r"stage 0 \(8x8, 4 modules\): bn1, layer1.0.bn1"):
        model(images())


@pytest.mark.parametrize(
    ("sites", "named"),
    [("head.*", "'head.*'"), (["bn1", "nope"], "'nope'"), (nn.LayerNorm, "LayerNorm")],
)
def test_a_selector_that_matches_nothing_is_named(sites, named):
    model = TinyResNet()
    with pytest.raises(ValueError, match=f"selector {named} matches no module"):
        ad.apply_pattern(model, conv_pattern(), sites=sites)
    assert _structure(model) == _structure(TinyResNet())


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="pattern"):
        ad.apply_pattern(TinyResNet(), conv_site())
    with pytest.raises(ValueError, match="model"):
        ad.apply_pattern("resnet", conv_pattern())
    with pytest.raises(ValueError, match="sites"):
        ad.apply_pattern(TinyResNet(), conv_pattern(), sites=3)


def test_one_site_per_module_in_order_or_one_shared_site():
    model = TinyResNet()
    distinct = ad.Pattern("conv", [conv_site(size_h=i + 1) for i in range(7)])
    handle = ad.apply_pattern(model, distinct)
    assert [layer.site["size_h"] for layer in handle.dropouts.values()] == list(range(1, 8))
    shared = ad.apply_pattern(model, conv_pattern(size_h=3))
    layers = list(shared.dropouts.values())
    assert all(layer.site == shared.pattern.sites[0] for layer in layers)
    assert len({id(layer) for layer in layers}) == 7  # own layer each: independent masks


def test_sequence_default_sites_per_sublayer():
    model = small_gpt()
    handle = ad.apply_pattern(model, sequence_pattern())
    assert len(handle.module_names) == 1 + 4 * 2
    assert {layer.sublayer for layer in handle.dropouts.values()} == set(SUBLAYERS)
    assert handle.dropouts["transformer.h.1.attn.attn_dropout"].sublayer == "attention_probs"
    assert handle.dropouts["transformer.h.0.mlp.dropout"].sublayer == "ffn_output"
    assert handle.dropouts["transformer.drop"].sublayer == "embedding"


def test_sequence_sites_map_to_blocks_per_sublayer():
    model = small_gpt()
    per_block = ad.Pattern("sequence", [sequence_site(["attention_probs", "ffn_hidden"], size=1),
                                        sequence_site(["attention_probs", "ffn_hidden"], size=3)])
    handle = ad.apply_pattern(model, per_block)
    assert {name: layer.site["size"] for name, layer in handle.dropouts.items()} == {
        "transformer.h.0.attn.attn_dropout": 1, "transformer.h.0.mlp.hidden_dropout": 1,
        "transformer.h.1.attn.attn_dropout": 3, "transformer.h.1.mlp.hidden_dropout": 3}
    with pytest.raises(ValueError, match=r"sites\['attention_probs'\]: the pattern has 3 sites "
                                         r"but 2 modules matched"):
        ad.apply_pattern(model, sequence_pattern(["attention_probs"], n_sites=3))


def test_sequence_sites_override_defaults_by_sublayer():
    model = small_gpt()
    handle = ad.apply_pattern(model, sequence_pattern(["ffn_output", "embedding"]),
                              sites={"ffn_output": "transformer.h.1.mlp.dropout"})
    assert handle.module_names == ["transformer.drop", "transformer.h.1.mlp.dropout"]
    with pytest.raises(ValueError, match="must map sub-layers"):
        ad.apply_pattern(model, sequence_pattern(), sites="*.drop")
    with pytest.raises(ValueError, match="'ffn' is not a sub-layer"):
        ad.apply_pattern(model, sequence_pattern(), sites={"ffn": "*"})
    with pytest.raises(ValueError, match="both attention_output and ffn_output"):
        ad.apply_pattern(model, sequence_pattern(["attention_output", "ffn_output"]),
                         sites={"attention_output": "*.mlp.dropout"})
    with pytest.raises(ValueError, match=r"sites\['embedding'\] \(default\): no module matches "
                                         r"the default slots \['drop', '\*.drop'\]; pass sites="):
        ad.apply_pattern(TinyResNet(), sequence_pattern(["embedding"]))


# -- the pattern acts ----------------------------------------------------------------------------
def test_attention_probabilities_are_masked_per_key_span():
    model = small_gpt()
    pattern = sequence_pattern(["attention_probs"])
    ad.apply_pattern(model, pattern)
    seen = []
    model.transformer.h[0].attn.attn_dropout.register_forward_hook(
        lambda module, args, out: seen.append(out))
    model(tokens())
    probs = seen[0]  # (N, heads, T, T); axis=tokens, share: same keys hidden for all
    hidden_keys = (probs == 0).all(dim=2).all(dim=1)  # keys no query of any head sees
    assert hidden_keys.sum(dim=1).tolist() == [8, 8, 8]  # 16 keys, 2 of every 4 dropped


def _mask_of(raw, patterned):
    """The scaled mask m with patterned = raw * m, from a raw tensor with no exact zeros."""
    assert torch.all(raw != 0)
    mask = patterned / raw
    kept = patterned != 0
    scale = mask[kept].mean()
    torch.testing.assert_close(mask[kept], scale.expand(int(kept.sum())))
    assert 0 < kept.float().mean() < 1 and scale > 1
    return torch.where(kept, scale, torch.zeros(()))


class Capture:
    def __init__(self, module):
        self.outputs = []
        module.register_forward_hook(lambda m, args, out: self.outputs.append(out.clone()))

    @property
    def last(self):
        return self.outputs[-1]


class InputCapture:
    def __init__(self, module, prepend=False):
        self.inputs = []
        module.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0].clone()),
                                         prepend=prepend)


@pytest.mark.parametrize(("make", "block_name", "site", "branch", "make_input"), [
    (TinyResNet, "layer1.0", "bn2", None, images),
    (TinyResNet, "layer2.0", "bn3", "downsample", images),
    (lambda: WideResNet(depth=10, width=1), "group1.0", "bn2", "shortcut",
     lambda: images(channels=1, size=12)),
    (lambda: WideResNet(depth=10, width=1), "group2.0", "bn2", "shortcut",
     lambda: images(channels=1, size=12)),
])
def test_residual_branch_gets_the_same_mask(make, block_name, site, branch, make_input):
    model = make()
    block = model.get_submodule(block_name)
    site_raw = Capture(getattr(block, site))
    branch_raw = InputCapture(block) if branch is None else Capture(getattr(block, branch))
    handle = ad.apply_pattern(model, conv_pattern(residual=True, share_c=False))
    assert block_name in handle.residual_blocks
    site_out = Capture(getattr(block, site))
    branch_out = Capture(block if branch is None else getattr(block, branch))
    x = make_input()
    model(x)
    mask = _mask_of(site_raw.last, site_out.last)
    if branch is None:  # identity: the addition sees x * mask; torchvision adds, then relu
        torch.testing.assert_close(branch_out.last,
                                   F.relu(site_out.last + branch_raw.inputs[-1] * mask))
    else:
        torch.testing.assert_close(branch_out.last, branch_raw.last * mask)
    model(x)  # a fresh mask every call
    assert not torch.equal(_mask_of(site_raw.last, site_out.last), mask)


def test_residual_false_leaves_the_branch_alone():
    model = TinyResNet()
    raw = Capture(model.layer2[0].downsample)
    handle = ad.apply_pattern(model, conv_pattern(residual=False))
    assert handle.residual_blocks == []
    assert model.layer1[0].downsample is None
    out = Capture(model.layer2[0].downsample)
    model(images())
    assert torch.equal(raw.last, out.last)


class PooledBlock(nn.Module):
    """A block using the ``residual_site`` protocol, whose branch is half the site's size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, 1, 1)
        self.bn = nn.BatchNorm2d(4)
        self.residual_site = nn.AvgPool2d(2)

    def forward(self, x):
        return F.max_pool2d(self.bn(self.conv(x)), 2) + self.residual_site(x)


def test_residual_mask_is_resampled_to_a_smaller_branch():
    model = nn.Sequential(PooledBlock())
    site_raw, branch_raw = Capture(model[0].bn), Capture(model[0].residual_site)
    ad.apply_pattern(model, conv_pattern(residual=True, size_h=4, size_w=4, stride=8))
    site_out, branch_out = Capture(model[0].bn), Capture(model[0].residual_site)
    model(torch.randn(2, 4, 16, 16))
    mask = _mask_of(site_raw.last, site_out.last)
    expected = branch_raw.last * F.interpolate(mask, size=(8, 8), mode="nearest")
    torch.testing.assert_close(branch_out.last, expected)


# -- restore, eval, state ------------------------------------------------------------------------
def _structure(model):
    return [(name, type(m), sorted(vars(m)), list(m._modules), len(m._forward_hooks),
             len(m._forward_pre_hooks)) for name, m in model.named_modules()]


@pytest.mark.parametrize("case", list(CASES))
def test_remove_restores_the_model_exactly(case):
    make, make_input, make_pattern = CASES[case]
    model, x = make(), make_input()
    structure, parameters = _structure(model), list(model.parameters())
    snapshot = copy.deepcopy(model.state_dict())
    eval_before = model.eval()(x)
    train_before = seeded(model.train(), x)

    handle = ad.apply_pattern(model, make_pattern())
    assert not torch.equal(seeded(model, x), train_before)
    handle.remove()
    handle.remove()  # idempotent

    assert _structure(model) == structure
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    model.load_state_dict(snapshot)  # undo the running statistics the patterned call moved
    assert torch.equal(model.eval()(x), eval_before)
    assert torch.equal(seeded(model.train(), x), train_before)


def test_downsample_none_stays_none_while_applied():
    model = TinyResNet()
    block = model.layer1[0]
    with ad.apply_pattern(model, conv_pattern(residual=True)) as handle:
        assert handle.applied and "layer1.0" in handle.residual_blocks
        assert block.downsample is None and "downsample" not in block._modules
    assert not handle.applied
    assert block.downsample is None and "downsample" not in block._modules


@pytest.mark.parametrize("case", list(CASES))
def test_eval_turns_every_pattern_off(case):
    make, make_input, make_pattern = CASES[case]
    model, x = make(), make_input()
    reference = model.eval()(x)
    handles = [ad.apply_pattern(model.train(), make_pattern()) for _ in range(2)]
    model.eval()
    assert all(not layer.training for h in handles for layer in h.dropouts.values())
    assert torch.equal(model(x), reference)
    model.train()
    assert all(layer.training for h in handles for layer in h.dropouts.values())


def test_a_pattern_applied_to_an_eval_model_starts_off():
    model, x = TinyResNet().eval(), images()
    reference = model(x)
    handle = ad.apply_pattern(model, conv_pattern())
    assert not any(layer.training for layer in handle.dropouts.values())
    assert torch.equal(model(x), reference)


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_keys_unchanged_and_layers_visible_to_module_methods(case):
    make, make_input, make_pattern = CASES[case]
    model = make()
    keys = list(model.state_dict())
    handle = ad.apply_pattern(model, make_pattern())
    assert list(model.state_dict()) == keys
    model.load_state_dict(make().state_dict())  # strict: unpatterned checkpoints still load
    registered = {id(m) for m in model.modules()}  # what .to(), .train(), .apply() traverse
    assert all(id(layer) in registered for layer in handle.dropouts.values())
    x = make_input()
    model.to(torch.float64)
    out = model(x if case == "gpt" else x.double())
    assert out.dtype == torch.float64


def test_strip_pattern_removes_every_pattern():
    model = TinyResNet()
    structure = _structure(model)
    assert ad.strip_pattern(model) == 0
    ad.apply_pattern(model, conv_pattern(residual=True))
    ad.apply_pattern(model, conv_pattern(), sites="layer1.*.bn*")
    assert ad.strip_pattern(model) == 2
    assert _structure(model) == structure


def test_removing_one_pattern_keeps_the_other():
    model = TinyResNet()
    first = ad.apply_pattern(model, conv_pattern(residual=True))
    second = ad.apply_pattern(model, conv_pattern(), sites="layer1.*.bn*")
    first.remove()
    layers = [m for m in model.modules() if isinstance(m, ad.PatternDropout)]
    assert second.applied and not first.applied and len(layers) == 2
    assert model.layer1[0].downsample is None
    assert not torch.equal(seeded(model, images()), seeded(model, images()))


def _pattern_hooks(model):
    """(module, hook table, pattern key) of every hook a pattern owns."""
    return sorted((name, table, hook.key) for name, m in model.named_modules()
                  for table in ("_forward_hooks", "_forward_pre_hooks")
                  for hook in getattr(m, table).values() if hasattr(hook, "key"))


def test_an_identity_masked_by_two_patterns_keeps_the_second_after_the_first_goes():
    model = TinyResNet()
    block = model.layer1[0]
    first = ad.apply_pattern(model, conv_pattern(residual=True))
    alone = [(name, table) for name, table, _ in _pattern_hooks(model)]
    second = ad.apply_pattern(model, conv_pattern(residual=True))
    main_in, block_in = InputCapture(block.conv1), InputCapture(block, prepend=True)
    x = images()
    model(x)
    assert torch.equal(main_in.inputs[-1], block_in.inputs[-1])  # the main branch sees x
    first.remove()
    assert second.applied and block.downsample is None
    assert _pattern_hooks(model) == [(name, table, second.key) for name, table in alone]
    model(x)
    assert torch.equal(main_in.inputs[-1], block_in.inputs[-1])
    second.remove()
    assert _pattern_hooks(model) == []


def test_a_deep_copy_is_patterned_on_its_own_layers():
    model = TinyResNet()
    handle = ad.apply_pattern(model, conv_pattern(residual=True))
    clone = copy.deepcopy(model)
    x = images()
    torch.testing.assert_close(seeded(clone, x), seeded(model, x), rtol=0, atol=0)
    clone.eval()  # the clone's hooks follow the clone's layers: deterministic now
    assert torch.equal(seeded(clone, x, seed=1), seeded(clone, x, seed=2))
    assert all(layer.training for layer in handle.dropouts.values())
    assert ad.strip_pattern(clone) == 1 and handle.applied
    assert clone.layer1[0].downsample is None and model.layer1[0].downsample is None
    assert len(clone.layer1[0]._forward_pre_hooks) == 0
    assert len(model.layer1[0]._forward_pre_hooks) == 2  # the model keeps its pattern


# -- training ------------------------------------------------------------------------------------
def _learns(model, inputs, targets, loss_fn, steps, lr):
    """Train with the pattern on; return the eval-mode loss before and after."""
    loss_before = loss_fn(model.eval()(inputs), targets).item()
    optimizer = torch.optim.Adam(model.train().parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
    return loss_before, loss_fn(model.eval()(inputs), targets).item()


def test_a_patterned_wide_resnet_learns():
    model = WideResNet(depth=10, width=1, num_classes=4)
    ad.apply_pattern(model, conv_pattern(residual=True))
    labels = torch.randint(0, 4, (64,))
    x = torch.randn(64, 1, 12, 12)
    for i, label in enumerate(labels.tolist()):  # class = the quadrant holding a bright patch
        row, col = divmod(label, 2)
        x[i, 0, row * 6 + 1: row * 6 + 5, col * 6 + 1: col * 6 + 5] += 2.0
    before, after = _learns(model, x, labels, F.cross_entropy, steps=20, lr=1e-2)
    assert after < 0.5 * before


def test_a_patterned_language_model_learns():
    model = small_gpt()
    ad.apply_pattern(model, sequence_pattern())
    sequence = (torch.randint(0, VOCAB, (16, 1)) + torch.arange(17)) % VOCAB
    before, after = _learns(model, sequence[:, :-1], sequence[:, 1:],
                            lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()),
                            steps=60, lr=3e-3)
    assert after < 0.5 * before


def test_conv_sites_mapping_gives_each_site_its_own_selector():
    model = WideResNet(depth=16, width=1)
    pattern = ad.Pattern("conv", [conv_site(stride=4), conv_site(stride=8)])
    rest = ["group2.*.bn*", "group3.*.bn*", "bn"]
    handle = ad.apply_pattern(model, pattern, {0: "group1.*.bn*", 1: rest})
    strides = {name: layer.site["stride"] for name, layer in handle.dropouts.items()}
    assert [n for n, s in strides.items() if s == 4] == [
        f"group1.{b}.bn{i}" for b in (0, 1) for i in (1, 2)]
    assert "bn" in strides and all(strides[n] == 8 for n in strides if not n.startswith("group1"))
    handle.remove()
    with pytest.raises(ValueError, match=r"one selector per site \(index 0..1\), got keys \[0\]"):
        ad.apply_pattern(model, pattern, {0: "group1.*.bn*"})
    with pytest.raises(ValueError, match=r"group1.0.bn1 is selected by both site 0 and site 1"):
        ad.apply_pattern(model, pattern, {0: "group1.*.bn*", 1: nn.BatchNorm2d})
