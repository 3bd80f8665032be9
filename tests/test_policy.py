"""PatternPolicy's incremental sampler against a full forward pass and the old sampler."""

import pytest
import torch
from torch import nn

import search_spaces
from controller.policy import PatternPolicy

CONVNET_COUNTS = [len(d.choices) for d in search_spaces.load("convnet").decisions]
# float32 rounding: with the logits of these policies (|logit| < 6) the cached sampler is
# within 1e-6 of ``score``, as the old sampler is; the error grows with the logits' size.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}

CONFIGS = [  # (architecture, layers, heads, hidden size)
    ("transformer", 1, 4, 64),  # the shipped spaces' setting
    ("transformer", 2, 1, 32),
    ("transformer", 2, 4, 32),
    ("transformer", 3, 2, 16),
    ("lstm", 1, 4, 64),
    ("lstm", 2, 4, 32),
]


@torch.no_grad()
def reference_sample(policy, batch, generator, allowed=None):
    """The sampler before the K/V cache: re-runs the body over the whole prefix each step
    (``allowed(step, prefix) -> (B, C) bool``: the masked distribution, for the mask tests)."""
    tokens = torch.zeros(batch, 0, dtype=torch.long)
    log_probs, state = [], None
    for step in range(len(policy.choice_counts)):
        inputs = torch.cat([policy.start.expand(batch, 1, -1),
                            policy.token_embedding(tokens + policy.offsets[: tokens.shape[1]])], 1)
        inputs = inputs + policy.position.weight[: tokens.shape[1] + 1]
        if isinstance(policy.body, nn.LSTM):
            output, state = policy.body(inputs[:, -1:], state)
            hidden = output[:, -1]
        else:
            mask = nn.Transformer.generate_square_subsequent_mask(inputs.shape[1])
            hidden = policy.body(inputs, mask=mask, is_causal=True)[:, -1]
        logits = policy.heads[step](hidden)
        if allowed is not None and allowed(step, tokens) is not None:
            logits = logits.masked_fill(~allowed(step, tokens), float("-inf"))
        choice = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        log_probs.append(torch.log_softmax(logits, -1).gather(1, choice))
        tokens = torch.cat([tokens, choice], dim=1)
    return tokens, torch.cat(log_probs, dim=1)


def make_policy(architecture, layers, heads, hidden, seed, counts=CONVNET_COUNTS):
    torch.manual_seed(seed)
    policy = PatternPolicy(counts, hidden_size=hidden, layers=layers, heads=heads,
                           architecture=architecture)
    with torch.no_grad():  # away from the initialisation (zero biases, start): all matter
        for parameter in policy.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return policy


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("batch", [1, 5])
def test_sample_matches_score_and_the_old_sampler(config, batch):
    for seed in range(3):
        policy = make_policy(*config, seed=seed)
        new_generator = torch.Generator().manual_seed(100 + seed)
        old_generator = torch.Generator().manual_seed(100 + seed)
        tokens, log_probs = policy.sample(batch, generator=new_generator)
        old_tokens, old_log_probs = reference_sample(policy, batch, old_generator)

        assert tokens.shape == log_probs.shape == (batch, len(CONVNET_COUNTS))
        assert tokens.dtype == torch.long and log_probs.dtype == torch.float32
        torch.testing.assert_close(tokens, old_tokens, rtol=0, atol=0)
        assert torch.equal(new_generator.get_state(), old_generator.get_state())  # same stream
        torch.testing.assert_close(log_probs, old_log_probs, **TOLERANCE)
        with torch.no_grad():
            scored, _ = policy.score(tokens)
        torch.testing.assert_close(log_probs, scored, **TOLERANCE)


@pytest.mark.parametrize("architecture", ["transformer", "lstm"])
def test_sample_follows_weight_updates_and_eval_mode(architecture):
    policy = make_policy(architecture, 1, 4, 64, seed=0)
    policy.sample(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        policy.heads[3].bias.add_(5.0)  # per-call tables must see the change
        policy.token_embedding.weight.mul_(2.0)
    policy.eval()  # the old sampler then took nn's fast path; the results must not change
    tokens, log_probs = policy.sample(4, generator=torch.Generator().manual_seed(1))
    old_tokens, old_log_probs = reference_sample(policy, 4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(tokens, old_tokens, rtol=0, atol=0)
    torch.testing.assert_close(log_probs, old_log_probs, **TOLERANCE)


def test_single_decision_and_single_choice():
    for architecture in ("transformer", "lstm"):
        for counts in ([3], [1, 4, 1]):
            policy = make_policy(architecture, 2, 2, 8, seed=0, counts=counts)
            tokens, log_probs = policy.sample(3, generator=torch.Generator().manual_seed(0))
            old_tokens, _ = reference_sample(policy, 3, torch.Generator().manual_seed(0))
            torch.testing.assert_close(tokens, old_tokens, rtol=0, atol=0)
            torch.testing.assert_close(log_probs, policy.score(tokens)[0].detach(), **TOLERANCE)


@pytest.mark.parametrize("architecture", ["transformer", "lstm"])
def test_samples_feed_autograd(architecture):
    """``sample`` runs under inference mode but returns ordinary tensors."""
    policy = make_policy(architecture, 1, 4, 16, seed=0)
    tokens, log_probs = policy.sample(3)
    assert not tokens.is_inference() and not log_probs.is_inference()
    scored, entropy = policy.score(tokens)
    (scored.sum() - log_probs.sum() + entropy.sum()).backward()
    assert policy.heads[0].weight.grad is not None


def test_non_finite_weights_raise():
    policy = make_policy("transformer", 1, 4, 16, seed=0)
    with torch.no_grad():
        policy.heads[2].weight.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="not finite"):
        policy.sample(1)


EXPECTED_STATE = {  # the keys and shapes before the K/V cache: old checkpoints must load
    "transformer": {
        "start": (8,), "token_embedding.weight": (9, 8), "position.weight": (3, 8),
        "body.layers.0.self_attn.in_proj_weight": (24, 8),
        "body.layers.0.self_attn.in_proj_bias": (24,),
        "body.layers.0.self_attn.out_proj.weight": (8, 8),
        "body.layers.0.self_attn.out_proj.bias": (8,),
        "body.layers.0.linear1.weight": (16, 8), "body.layers.0.linear1.bias": (16,),
        "body.layers.0.linear2.weight": (8, 16), "body.layers.0.linear2.bias": (8,),
        "body.layers.0.norm1.weight": (8,), "body.layers.0.norm1.bias": (8,),
        "body.layers.0.norm2.weight": (8,), "body.layers.0.norm2.bias": (8,),
        "heads.0.weight": (2, 8), "heads.0.bias": (2,), "heads.1.weight": (3, 8),
        "heads.1.bias": (3,), "heads.2.weight": (4, 8), "heads.2.bias": (4,),
    },
    "lstm": {
        "start": (8,), "token_embedding.weight": (9, 8), "position.weight": (3, 8),
        "body.weight_ih_l0": (32, 8), "body.weight_hh_l0": (32, 8),
        "body.bias_ih_l0": (32,), "body.bias_hh_l0": (32,),
        "heads.0.weight": (2, 8), "heads.0.bias": (2,), "heads.1.weight": (3, 8),
        "heads.1.bias": (3,), "heads.2.weight": (4, 8), "heads.2.bias": (4,),
    },
}


@pytest.mark.parametrize("architecture", ["transformer", "lstm"])
def test_state_dict_is_unchanged(architecture):
    policy = PatternPolicy([2, 3, 4], hidden_size=8, layers=1, heads=2, architecture=architecture)
    state = policy.state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == EXPECTED_STATE[architecture]
    old_style = {key: torch.randn(shape) for key, shape in EXPECTED_STATE[architecture].items()}
    fresh = PatternPolicy([2, 3, 4], hidden_size=8, layers=1, heads=2, architecture=architecture)
    fresh.load_state_dict(old_style)  # strict
    tokens, log_probs = fresh.sample(4, generator=torch.Generator().manual_seed(0))
    old_tokens, old_log_probs = reference_sample(fresh, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(tokens, old_tokens, rtol=0, atol=0)
    torch.testing.assert_close(log_probs, old_log_probs, **TOLERANCE)


# masks (max_drop) ----------------------------------------------------------------------------

CONVNET = search_spaces.load("convnet")


def parity_mask(step, prefix):
    """A prefix-dependent mask for the tests: choice c allowed iff c == 0 or c + sum(prefix)
    is even (never empty)."""
    count = CONVNET_COUNTS[step]
    choices = torch.arange(count)
    total = prefix.sum(1, keepdim=True) if prefix.shape[1] else torch.zeros(prefix.shape[0], 1,
                                                                             dtype=torch.long)
    return (choices == 0) | ((choices + total) % 2 == 0)


def favour_dropping(policy, space):
    """Biases the heads towards the choices that drop the most (large tiles, stride 1, fill,
    p_* = 1), so that an unmasked policy mostly leaves the bound."""
    favourite = {"size_h": -1, "size_w": -1, "stride": 0, "repeat": -1, "p_apply": 0, "p_tile": 0}
    with torch.no_grad():
        for head, decision in zip(policy.heads, space.decisions):
            if decision.name in favourite:
                head.bias.zero_()
                head.bias[favourite[decision.name]] = 6.0


def convnet_mask(step, prefix):
    """The shipped space's masks, looked up through the pure-Python ``ChoiceMasks.allowed``."""
    rows = [CONVNET.choice_masks.allowed(step, row.tolist()) for row in prefix]
    return None if rows[0] is None else torch.tensor(rows)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("masks", ["parity", "convnet"])
def test_masked_sample_matches_masked_score_and_the_masked_reference(config, masks):
    allowed, reference = {"parity": (parity_mask, parity_mask),
                          "convnet": (CONVNET.choice_masks, convnet_mask)}[masks]
    for seed in range(2):
        policy = make_policy(*config, seed=seed)
        if masks == "convnet":
            favour_dropping(policy, CONVNET)
        tokens, log_probs = policy.sample(6, generator=torch.Generator().manual_seed(seed),
                                          allowed=allowed)
        old_tokens, old_log_probs = reference_sample(policy, 6, torch.Generator().manual_seed(seed),
                                                     reference)
        torch.testing.assert_close(tokens, old_tokens, rtol=0, atol=0)
        torch.testing.assert_close(log_probs, old_log_probs, **TOLERANCE)
        scored, entropy = policy.score(tokens, allowed=allowed)
        torch.testing.assert_close(log_probs, scored.detach(), **TOLERANCE)  # ratio exactly 1
        assert torch.isfinite(entropy).all()
        for step in range(tokens.shape[1]):
            mask = reference(step, tokens[:, :step])
            if mask is not None:
                assert mask.expand(6, -1).gather(1, tokens[:, step : step + 1]).all()
        if masks == "convnet":
            assert all(CONVNET.within_bound(CONVNET.decode(row.tolist())) for row in tokens)
            unmasked = policy.sample(6, generator=torch.Generator().manual_seed(seed))[0]
            assert not all(CONVNET.within_bound(CONVNET.decode(row.tolist())) for row in unmasked)


def test_masked_score_is_the_masked_distribution_and_its_gradient():
    policy = make_policy("transformer", 1, 4, 16, seed=0)
    tokens, _ = policy.sample(4, generator=torch.Generator().manual_seed(0), allowed=parity_mask)
    scored, entropy = policy.score(tokens, allowed=parity_mask)
    hidden = policy._hidden(policy._inputs(tokens[:, :-1]))
    for step in (0, 5, len(CONVNET_COUNTS) - 1):
        logits = policy.heads[step](hidden[:, step])
        mask = parity_mask(step, tokens[:, :step]).expand_as(logits)
        probs = torch.softmax(logits, -1) * mask
        probs = probs / probs.sum(-1, keepdim=True)  # the renormalised (conditional) head
        expected = probs.gather(1, tokens[:, step : step + 1])[:, 0].log()
        torch.testing.assert_close(scored[:, step], expected, **TOLERANCE)
        plogp = torch.where(mask, probs * probs.clamp(min=1e-30).log(), 0.0)
        torch.testing.assert_close(entropy[:, step], -plogp.sum(-1), **TOLERANCE)
    (scored.sum() + entropy.sum()).backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_no_mask_is_the_unmasked_policy():
    policy = make_policy("lstm", 1, 4, 16, seed=0)
    plain = policy.sample(3, generator=torch.Generator().manual_seed(5))
    none = policy.sample(3, generator=torch.Generator().manual_seed(5), allowed=None)
    always = policy.sample(3, generator=torch.Generator().manual_seed(5),
                           allowed=lambda step, prefix: None)
    for other in (none, always):
        torch.testing.assert_close(plain[0], other[0], rtol=0, atol=0)
        torch.testing.assert_close(plain[1], other[1], rtol=0, atol=0)
