"""Dropout with a learned rate: variational (Gaussian), sparse variational and concrete dropout.

Each layer exposes a regulariser (``.kl()`` or ``.regularization()``) that belongs in the loss;
:func:`variational_kl` sums them over a model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autodropout.validation import check_choice, check_probability, check_real

from .base import DropoutLayer

# The sampled pre-activation's std is sqrt(var + _VAR_EPS): sqrt's gradient stays finite at 0.
_VAR_EPS = 1e-8


def _check_weight_module(module: object, layer: str) -> nn.Linear | nn.Conv2d:
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        kind = type(module).__name__
        raise ValueError(f"{layer}: module must be an nn.Linear or nn.Conv2d, got {kind}")
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"{layer}: module must be materialised, lazy modules are not supported")
    return module


def _apply_weight(
    module: nn.Linear | nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None
) -> Tensor:
    """Run ``module``'s operation (linear or its exact convolution settings) with other weights."""
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, weight, bias)
    return F.linear(x, weight, bias)


def _sample_preactivation(mean: Tensor, var: Tensor) -> Tensor:
    """Local reparameterisation: one Gaussian draw per pre-activation, mean + sqrt(var) * eps."""
    return mean + torch.sqrt(var + _VAR_EPS) * torch.randn_like(mean)


class VariationalDropout(DropoutLayer):
    r"""Gaussian dropout with a learned rate (Kingma, Salimans & Welling, 2015).

    "Variational Dropout and the Local Reparameterization Trick". Every weight of the wrapped
    ``nn.Linear`` / ``nn.Conv2d`` is multiplied by independent noise
    :math:`\xi \sim \mathcal{N}(1, \alpha)`, that is
    :math:`w \sim \mathcal{N}(\theta, \alpha\theta^2)`.
    Training never samples the weights; it samples the pre-activation directly (local
    reparameterisation trick)::

        b = module(x) + sqrt(op(x**2, alpha * W**2)) * eps,    eps ~ N(0, 1)

    where ``op`` is the module's linear map or convolution (without bias). Evaluation uses the
    mean weights: the output is exactly ``module(x)``.

    ``alpha`` is learned as ``log_alpha``, one per layer (``granularity="layer"``) or one per input
    unit / input channel (``granularity="unit"``), initialised from ``p``, the *drop* probability of
    the Bernoulli dropout whose variance the noise matches: ``alpha = p / (1 - p)``.

    :meth:`kl` is the paper's approximation of the KL divergence to the log-uniform prior, per
    weight: ``-KL ~= 0.5 log(alpha) + c1 alpha + c2 alpha**2 + c3 alpha**3`` (constant dropped),
    fitted for ``alpha <= 1``. As in the paper, ``alpha`` is clamped to at most 1 (p = 0.5) in both
    the forward pass and the KL; a ``log_alpha`` above 0 acts as 0 and gets no gradient. Hence the
    accepted initial ``p`` is ``(0, 0.5]``: 0 would put ``log_alpha`` at minus infinity and
    ``p > 0.5`` would start in the clamped, gradient-free region.
    """

    KL_C1 = 1.16145124
    KL_C2 = -1.50204118
    KL_C3 = 0.58629921

    def __init__(self, module: nn.Module, p: float = 0.5, granularity: str = "unit") -> None:
        super().__init__()
        self.module = _check_weight_module(module, type(self).__name__)
        p = check_probability(p)
        if not 0.0 < p <= 0.5:
            raise ValueError(f"p must be in (0, 0.5] (alpha = p/(1-p) <= 1), got {p!r}")
        self.init_p = p
        self.granularity = check_choice(granularity, ("layer", "unit"), "granularity")
        self.log_alpha = nn.Parameter(torch.full(self._log_alpha_shape(), math.log(p / (1.0 - p))))

    def _log_alpha_shape(self) -> tuple[int, ...]:
        if self.granularity == "layer":
            return ()
        if isinstance(self.module, nn.Conv2d):
            return (self.module.in_channels, 1, 1)
        return (self.module.in_features,)

    def clamped_log_alpha(self) -> Tensor:
        """``log_alpha`` limited to <= 0 (alpha <= 1), the value every computation uses."""
        return self.log_alpha.clamp(max=0.0)

    def forward(self, x: Tensor) -> Tensor:
        mean = self.module(x)
        if not self.training:
            return mean
        # alpha multiplies x**2 (per input unit/channel), which equals scaling the columns of W**2.
        alpha_x2 = x * x * self.clamped_log_alpha().exp()
        var = _apply_weight(self.module, alpha_x2, self.module.weight**2, None)
        return _sample_preactivation(mean, var)

    def kl(self) -> Tensor:
        """Approximate KL(q(W) || log-uniform prior), summed over every weight (a 0-dim tensor)."""
        log_alpha = self.clamped_log_alpha()
        alpha = log_alpha.exp()
        c1, c2, c3 = self.KL_C1, self.KL_C2, self.KL_C3
        neg_kl = 0.5 * log_alpha + c1 * alpha + c2 * alpha**2 + c3 * alpha**3
        weights_per_alpha = self.module.weight.numel() // self.log_alpha.numel()
        return -neg_kl.sum() * weights_per_alpha

    def extra_repr(self) -> str:
        return f"init_p={self.init_p}, granularity={self.granularity!r}"


class SparseVariationalDropout(DropoutLayer):
    r"""Variational dropout with one unbounded rate per weight (Molchanov, Ashukha & Vetrov, 2017).

    "Variational Dropout Sparsifies Deep Neural Networks". Each weight has its own
    :math:`w_{ij} \sim \mathcal{N}(\theta_{ij}, \sigma^2_{ij})`, parameterised additively by the
    wrapped module's weight ``theta`` and ``log_sigma2`` (initialised to -10); the dropout rate is
    derived, ``log_alpha = log_sigma2 - log(theta**2)``, so its drop probability is
    ``p = alpha / (1 + alpha)`` per weight. There is no fixed ``p`` argument: the rates are learned.

    Training samples the pre-activation (local reparameterisation)::

        b = op(x, theta) + bias + sqrt(op(x**2, sigma2)) * eps,    eps ~ N(0, 1)

    :meth:`kl` is the paper's approximation, summed over the weights::

        -KL ~= k1 * sigmoid(k2 + k3 * log_alpha) - 0.5 * log1p(exp(-log_alpha)) - k1

    with k1 = 0.63576, k2 = 1.87320, k3 = 1.48695. Evaluation uses the mean weights with every
    weight whose ``log_alpha > threshold`` set to zero (threshold 3 means p > 0.95).
    """

    KL_K1 = 0.63576
    KL_K2 = 1.87320
    KL_K3 = 1.48695
    INIT_LOG_SIGMA2 = -10.0

    def __init__(self, module: nn.Module, threshold: float = 3.0) -> None:
        super().__init__()
        self.module = _check_weight_module(module, type(self).__name__)
        self.threshold = check_real(threshold, "threshold")
        self.log_sigma2 = nn.Parameter(torch.full_like(module.weight, self.INIT_LOG_SIGMA2))

    def log_alpha(self) -> Tensor:
        weight = self.module.weight
        tiny = torch.finfo(weight.dtype).tiny
        return self.log_sigma2 - torch.log(weight * weight + tiny)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.module.weight, self.module.bias
        if not self.training:
            kept = self.log_alpha() <= self.threshold
            return _apply_weight(self.module, x, weight * kept, bias)
        mean = _apply_weight(self.module, x, weight, bias)
        var = _apply_weight(self.module, x * x, self.log_sigma2.exp(), None)
        return _sample_preactivation(mean, var)

    def kl(self) -> Tensor:
        """Approximate KL(q(W) || log-uniform prior), summed over every weight (a 0-dim tensor)."""
        log_alpha = self.log_alpha()
        k1, k2, k3 = self.KL_K1, self.KL_K2, self.KL_K3
        # log1p(exp(-a)) == softplus(-a), which stays finite for very negative log_alpha.
        neg_kl = k1 * torch.sigmoid(k2 + k3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - k1
        return -neg_kl.sum()

    def sparsity(self) -> float:
        """Fraction of weights zeroed at evaluation (``log_alpha > threshold``); syncs the host."""
        with torch.no_grad():
            return float((self.log_alpha() > self.threshold).float().mean())

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class ConcreteDropout(DropoutLayer):
    r"""Dropout with a drop probability learned by concrete relaxation (Gal, Hron & Kendall, 2017).

    "Concrete Dropout". The drop probability ``p = sigmoid(p_logit)`` is a parameter; ``p`` given
    to the constructor is its *initial* value, in ``(0, 1)`` exclusive (its logit must be finite).
    In training every input element gets a relaxed Bernoulli (concrete) drop indicator::

        z = sigmoid((log p - log(1 - p) + log u - log(1 - u)) / temperature),  u ~ U(0, 1)
        y = module(x * (1 - z) / (1 - p))

    which is differentiable in ``p`` and tends to a Bernoulli(p) drop mask as the temperature
    goes to 0. Without a ``module`` only the input is dropped. Evaluation applies the module to
    the untouched input (identity when ``module`` is None).

    :meth:`regularization` is the paper's term, to add to the loss::

        weight_regularizer * ||W||**2 / (1 - p)
            + dropout_regularizer * K * (p log p + (1 - p) log(1 - p))

    ``||W||**2`` sums the squares of every parameter of the wrapped module, and ``K`` is the number
    of input elements per example seen by the last training forward. The second term is the
    *negative* entropy of Bernoulli(p): minimising it maximises the entropy, pushing ``p`` towards
    0.5, against the data term that prefers a small ``p``.

    The layer has no settable ``p`` attribute (schedulers leave it alone); read :attr:`p_learned`.
    """

    def __init__(
        self,
        module: nn.Module | None = None,
        p: float = 0.1,
        temperature: float = 0.1,
        weight_regularizer: float = 1e-6,
        dropout_regularizer: float = 1e-5,
    ) -> None:
        super().__init__()
        if module is not None and not isinstance(module, nn.Module):
            raise ValueError(f"module must be an nn.Module or None, got {type(module).__name__}")
        p = check_probability(p)
        if not 0.0 < p < 1.0:
            raise ValueError(f"p must be in (0, 1) exclusive (its logit is learned), got {p!r}")
        self.module = module
        self.init_p = p
        self.temperature = check_real(temperature, "temperature", low=0, low_open=True)
        self.weight_regularizer = check_real(weight_regularizer, "weight_regularizer", low=0)
        self.dropout_regularizer = check_real(dropout_regularizer, "dropout_regularizer", low=0)
        self.p_logit = nn.Parameter(torch.tensor(math.log(p / (1.0 - p))))
        self.input_dim: int | None = None

    @property
    def p_learned(self) -> float:
        """The current drop probability sigmoid(p_logit), as a float (syncs the host)."""
        return float(torch.sigmoid(self.p_logit.detach()))

    def forward(self, x: Tensor) -> Tensor:
        if self.updates_state:
            self.input_dim = x[0].numel() if x.dim() > 1 else x.numel()
        if self.training:
            x = x * self.scaled_keep_mask(x)
        return x if self.module is None else self.module(x)

    def scaled_keep_mask(self, x: Tensor) -> Tensor:
        """Relaxed keep mask (1 - z) / (1 - p) of ``x``'s shape and dtype."""
        noise_dtype = torch.promote_types(x.dtype, torch.float32)
        tiny = torch.finfo(noise_dtype).eps
        u = torch.rand(x.shape, dtype=noise_dtype, device=x.device).clamp_(tiny, 1.0 - tiny)
        drop = torch.sigmoid((self.p_logit + torch.logit(u)) / self.temperature)
        # 1 - p == sigmoid(-p_logit) without cancellation when p is close to 1.
        return ((1.0 - drop) / torch.sigmoid(-self.p_logit)).to(x.dtype)

    def regularization(self) -> Tensor:
        """The paper's weight + dropout regulariser (a 0-dim tensor); needs one training forward."""
        if self.input_dim is None:
            raise RuntimeError("ConcreteDropout.regularization() needs a training forward first")
        p, keep = torch.sigmoid(self.p_logit), torch.sigmoid(-self.p_logit)
        neg_entropy = p * F.logsigmoid(self.p_logit) + keep * F.logsigmoid(-self.p_logit)
        reg = self.dropout_regularizer * self.input_dim * neg_entropy
        if self.module is not None:
            squared_norm = sum((w * w).sum() for w in self.module.parameters())
            reg = reg + self.weight_regularizer * squared_norm / keep
        return reg

    def extra_repr(self) -> str:
        return (
            f"init_p={self.init_p}, temperature={self.temperature}, "
            f"weight_regularizer={self.weight_regularizer}, "
            f"dropout_regularizer={self.dropout_regularizer}"
        )


def variational_kl(model: nn.Module) -> Tensor:
    """Sum of every learned-rate layer's regulariser in ``model``: add it to the training loss.

    ``.kl()`` of :class:`VariationalDropout` / :class:`SparseVariationalDropout` and
    ``.regularization()`` of :class:`ConcreteDropout`. For the ELBO, scale the KL by
    1 / (training set size) when the data loss is a per-example mean. Returns a 0-dim tensor
    (zero when the model has no such layer).
    """
    first_param = next(model.parameters(), None)
    total = torch.zeros((), device=None if first_param is None else first_param.device)
    for layer in model.modules():
        if isinstance(layer, (VariationalDropout, SparseVariationalDropout)):
            total = total + layer.kl()
        elif isinstance(layer, ConcreteDropout):
            total = total + layer.regularization()
    return total
