"""Patterns travel: stage-aware site mapping, and residual masks that keep the model's function.

Models (no torchvision here): a ResNet-18-style network of torchvision ``BasicBlock``s
(``downsample=None`` or a module), torchvision ``Bottleneck``s, a VGG-BN-like
``nn.Sequential`` and a pre-activation ResNet whose identity shortcut is ``None``; inputs
are non-square (40x32).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision_blocks import BasicBlock, Bottleneck, conv3, downsample

import autodropout as ad
import search_spaces

H, W = 40, 32


def images(n=2, channels=3):
    return torch.randn(n, channels, H, W)


def conv_site(**overrides):
    site = dict(size_h=2, size_w=2, stride=4, repeat="fill", rotate=0.0, shear_x=0.0,
                shear_y=0.0, share_c=False, residual=True)
    site.update(overrides)
    return site


def conv_pattern(n_sites=1, **overrides):
    return ad.Pattern("conv", [conv_site(size_h=1 + i % 3, **overrides) for i in range(n_sites)])


def convnet_pattern():
    """A 3-site pattern of the shipped convnet space, from a fixed token list."""
    space = search_spaces.load("convnet")
    tokens = [(3 * i + 1) % len(d.choices) for i, d in enumerate(space.decisions)]
    pattern = space.decode(tokens)
    assert len(pattern) == 3
    return pattern


# -- models ------------------------------------------------------------------------------------
class ResNet(nn.Module):
    """ResNet-18 layout (two BasicBlocks a stage) with ``len(widths)`` stages."""

    def __init__(self, widths=(4, 8, 8, 8), num_classes=5):
        super().__init__()
        self.conv1 = conv3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            first = BasicBlock(cin, width, stride,
                               downsample(cin, width, stride) if stride != 1 or cin != width
                               else None)
            setattr(self, f"layer{i + 1}", nn.Sequential(first, BasicBlock(width, width)))
            cin = width
        self.n_stages = len(widths)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(x.mean(dim=(2, 3)))


def vgg(cfg=(4, "M", 8, "M", 8, 8, "M", 8, 8, "M", 8, 8, "M")):
    """VGG-11-BN layout: 8 BatchNorms in 5 spatial stages (40x32 down to 2x2)."""
    layers, cin = [], 3
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
            cin = item
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 5))


class PreActBlock(nn.Module):
    """Pre-activation block whose identity shortcut is ``None``."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = conv3(cout, cout)
        self.shortcut = (None if stride == 1 and cin == cout
                         else nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        h = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return out + (x if self.shortcut is None else self.shortcut(h))


class PreActResNet(nn.Module):
    def __init__(self, widths=(4, 8, 8), num_classes=5):
        super().__init__()
        self.conv = conv3(3, widths[0])
        cin, stages = widths[0], []
        for i, width in enumerate(widths):
            stages.append(nn.Sequential(PreActBlock(cin, width, 1 if i == 0 else 2),
                                        PreActBlock(width, width)))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stages(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3)))


def batchnorms(model):
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


# -- stage-aware mapping -----------------------------------------------------------------------
def test_a_three_site_pattern_maps_by_stages_on_a_three_stage_resnet():
    model = ResNet(widths=(4, 8, 8))
    handle = ad.apply_pattern(model, convnet_pattern(), example_input=images())
    assert handle.module_names == batchnorms(model)
    expected = {name: 0 if name == "bn1" else int(name[len("layer")]) - 1
                for name in batchnorms(model)}
    assert handle.assignment == expected
    for name, layer in handle.dropouts.items():
        assert layer.site == handle.pattern.sites[expected[name]]
    text = str(handle)
    assert "3 sites -> 15 modules" in text
    assert "site 1: layer2.0.bn1, layer2.0.bn2, layer2.0.downsample.1, layer2.1.bn1" in text
    assert "applied" in repr(handle)


def test_four_stages_for_three_sites_is_an_error_listing_the_stages():
    model = ResNet()
    structure = [(n, list(m._modules), len(m._forward_hooks)) for n, m in model.named_modules()]
    with pytest.raises(ValueError) as error:
        ad.apply_pattern(model, convnet_pattern(), example_input=images())
    message = str(error.value)
    assert "3 sites but 20 modules matched in 4 stages" in message
    assert "stage 0 (40x32, 5 modules): bn1, layer1.0.bn1" in message
    assert "stage 1 (20x16, 5 modules): layer2.0.bn1, layer2.0.bn2, layer2.0.downsample.1" in message
    assert "stage 3 (5x4, 5 modules)" in message
    assert 'sites={0: "layer1.*.bn*", 1: ...}' in message and "single shared site" in message
    assert structure == [(n, list(m._modules), len(m._forward_hooks))
                         for n, m in model.named_modules()]


def test_without_example_input_a_mismatch_names_the_ways_to_choose():
    with pytest.raises(ValueError) as error:
        ad.apply_pattern(ResNet(), convnet_pattern())
    message = str(error.value)
    assert "3 sites but 20 modules matched (bn1, layer1.0.bn1" in message
    assert 'sites={0: "layer1.*.bn*", 1: ...}' in message and "example_input=" in message


def test_explicit_mapping_with_string_keys_as_read_from_yaml():
    model = ResNet()
    sites = {"0": ["bn1", "layer1.*.bn*"], "1": ["layer2.*.bn*", "layer2.*.downsample.1"],
             "2": ["layer[34].*.bn*", "layer[34].*.downsample.1"]}
    handle = ad.apply_pattern(model, convnet_pattern(), sites)
    assert handle.module_names == batchnorms(model)
    assert handle.assignment["layer1.1.bn2"] == 0 and handle.assignment["layer2.0.bn1"] == 1
    assert handle.assignment["layer4.0.downsample.1"] == 2
    handle.remove()
    with pytest.raises(ValueError, match="name a site twice"):
        ad.apply_pattern(model, convnet_pattern(), {0: "bn1", "0": "layer1.*", 1: "x"})


def test_vgg_maps_five_stages_and_lists_them_for_three_sites():
    model = vgg()
    assert len(batchnorms(model)) == 8
    handle = ad.apply_pattern(model, conv_pattern(5), example_input=images(1))
    assert list(handle.assignment.values()) == [0, 1, 2, 2, 3, 3, 4, 4]
    handle.remove()
    with pytest.raises(ValueError, match=r"in 5 stages .*stage 2 \(10x8, 2 modules\): 9, 12; "
                                         r"stage 3 \(5x4, 2 modules\)"):
        ad.apply_pattern(model, convnet_pattern(), example_input=images(1))


def test_a_three_stage_vgg_and_preact_resnet_map_automatically():
    model = vgg((4, 4, "M", 8, 8, "M", 8, 8))
    handle = ad.apply_pattern(model, convnet_pattern(), example_input=images(1))
    assert list(handle.assignment.values()) == [0, 0, 1, 1, 2, 2]
    preact = PreActResNet()
    handle = ad.apply_pattern(preact, convnet_pattern(), example_input=images(1))
    # a pre-activation bn1 sees the block input, so it belongs to the stage before
    assert handle.assignment["stages.1.0.bn1"] == 0 and handle.assignment["stages.1.0.bn2"] == 1
    assert handle.assignment["bn"] == 2


def test_one_to_one_and_shared_rules_stay_and_need_no_example_input():
    model = vgg()
    handle = ad.apply_pattern(model, conv_pattern(8))
    assert list(handle.assignment.values()) == list(range(8))
    handle.remove()
    assert set(ad.apply_pattern(model, conv_pattern(1)).assignment.values()) == {0}


def test_the_example_forward_changes_nothing():
    model = ResNet(widths=(4, 8, 8)).train()
    model.layer2.eval()
    snapshot = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    ad.apply_pattern(model, convnet_pattern(), example_input=(images(),))  # a tuple of args
    assert [m.training for m in model.modules() if not isinstance(m, ad.PatternDropout)] == modes
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())


# -- residual branches keep the model's function -------------------------------------------------
BLOCKS = {
    "basic_identity": (lambda: BasicBlock(4, 4), 4),
    "basic_downsample": (lambda: BasicBlock(4, 8, 2, downsample(4, 8, 2)), 4),
    "bottleneck_identity": (lambda: Bottleneck(8, 2), 8),
    "bottleneck_downsample": (lambda: Bottleneck(4, 2, 2, downsample(4, 8, 2)), 4),
    "preact_identity": (lambda: PreActBlock(4, 4), 4),
    "preact_conv": (lambda: PreActBlock(4, 8, 2), 4),
}
MODELS = {"resnet18": ResNet, "preact": PreActResNet, **{
    name: (lambda make=make: nn.Sequential(make())) for name, (make, _) in BLOCKS.items()}}


def _model_input(name):
    return images(2, BLOCKS[name][1] if name in BLOCKS else 3)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_output_is_bit_identical_and_remove_restores_exactly(name):
    model, x = MODELS[name]().eval(), _model_input(name)
    keys, reference = list(model.state_dict()), model(x)
    structure = [(n, type(m), list(m._modules)) for n, m in model.named_modules()]
    handle = ad.apply_pattern(model, conv_pattern(residual=True))
    assert handle.residual_blocks
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), reference)
    model.train()
    model(x)  # a training call in between leaves no state behind but the running stats
    model.eval()
    fresh = MODELS[name]().eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(model(x), fresh(x))
    handle.remove()
    assert _hook_count(model) == 0 and list(model.state_dict()) == keys
    assert [(n, type(m), list(m._modules)) for n, m in model.named_modules()] == structure
    assert torch.equal(model(x), fresh(x))


def _draw(layer, like):
    return layer(torch.ones_like(like))


def _hand_forward(block, x, layers):
    """The block's training output by hand: ``layers`` are the pattern's layers by site name.

    The last site's mask ``m`` multiplies both the last site's output and the residual branch;
    for an identity it is drawn at block entry (with the input's shape), otherwise when the
    last site runs. Every other site masks its own output.
    """
    branch = block.shortcut if isinstance(block, PreActBlock) else block.downsample
    last = {BasicBlock: "bn2", Bottleneck: "bn3", PreActBlock: "bn2"}[type(block)]
    m = _draw(layers[last], x) if branch is None else None

    def site(name, raw):
        nonlocal m
        if name != last:
            return layers[name](raw)
        if m is None:
            m = _draw(layers[last], raw)
        return raw * m

    if isinstance(block, PreActBlock):
        h = F.relu(site("bn1", block.bn1(x)))
        out = block.conv2(F.relu(site("bn2", block.bn2(block.conv1(h)))))
        return out + (x * m if branch is None else branch(h) * m)
    out = F.relu(site("bn1", block.bn1(block.conv1(x))))
    if isinstance(block, Bottleneck):
        out = F.relu(site("bn2", block.bn2(block.conv2(out))))
        out = site("bn3", block.bn3(block.conv3(out)))
    else:
        out = site("bn2", block.bn2(block.conv2(out)))
    ds = None if branch is None else layers["downsample.1"](branch[1](branch[0](x)))
    return F.relu(out + (x if ds is None else ds) * m)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_training_multiplies_the_residual_branch_by_the_last_sites_mask(name):
    make, channels = BLOCKS[name]
    block = make().train()
    plain = copy.deepcopy(block)
    handle = ad.apply_pattern(block, conv_pattern(residual=True))
    assert handle.residual_blocks == [""]
    x = images(2, channels)
    torch.manual_seed(7)
    patterned = block(x)
    torch.manual_seed(7)
    by_hand = _hand_forward(plain, x, handle.dropouts)
    torch.testing.assert_close(patterned, by_hand, rtol=0, atol=0)
    assert not torch.equal(patterned, plain(x))  # the pattern does act


def test_the_main_branch_of_an_identity_block_sees_the_unmasked_input():
    model = PreActResNet().train()
    block = model.stages[0][1]
    seen = []
    block.bn1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    entered = []
    block.register_forward_pre_hook(lambda m, args: entered.append(args[0]), prepend=True)
    ad.apply_pattern(model, conv_pattern(residual=True))
    model(images())
    assert seen[-1] is entered[-1]


class FunctionalFirst(nn.Module):
    """An identity block whose main branch starts with a function: no module gets ``x``."""

    def __init__(self):
        super().__init__()
        self.conv = conv3(4, 4)
        self.bn = nn.BatchNorm2d(4)
        self.shortcut = None

    def forward(self, x):
        return self.bn(self.conv(F.relu(x))) + x


def test_an_identity_that_cannot_be_told_apart_is_refused_in_training_only():
    model, x = nn.Sequential(FunctionalFirst()), images(2, 4)
    reference = model.eval()(x)
    ad.apply_pattern(model, conv_pattern(residual=True))
    assert torch.equal(model(x), reference)
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="no module of this block received its input"):
        model.train()(x)
    model.load_state_dict(snapshot)  # the running statistics the failed call moved
    assert torch.equal(model.eval()(x), reference)  # and no mask left behind
