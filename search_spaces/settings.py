"""The settings a space's ``budget:`` and ``controller:`` sections may hold: one table each,
with every setting's type, legal range, default and meaning.

The loader validates the YAML against these tables, the controller takes its defaults from
:data:`CONTROLLER_DEFAULTS`, ``--set KEY=VALUE`` parses by them, and the README's table of
controller settings is checked against them by a test: a setting is listed once, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autodropout.validation import check_bool, check_choice, check_int, check_real


@dataclass(frozen=True)
class Setting:
    """One setting: ``type`` is ``int``, ``number``, ``bool``, ``str`` or ``choice``; ``low``/``high``
    bound numbers (``low_open``: strictly above ``low``); ``default`` is ``None`` when the
    setting has none (it then comes from elsewhere, e.g. the dataset)."""

    name: str
    type: str
    doc: str
    default: Any = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()

    def check(self, value: Any, name: str | None = None, error: type[Exception] = ValueError) -> Any:
        """``value`` in canonical form, or ``error`` naming ``name`` (default: the setting)."""
        name = self.name if name is None else name
        if self.type == "int":
            return check_int(value, name, low=self.low, high=self.high, error=error)
        if self.type == "number":
            return check_real(value, name, low=self.low, high=self.high, low_open=self.low_open,
                              error=error)
        if self.type == "choice":
            return check_choice(value, self.choices, name, error=error)
        if self.type == "bool":
            return check_bool(value, name, error=error)
        if not isinstance(value, str) or not value:
            raise error(f"{name} must be a non-empty string, got {value!r}")
        return value

    def parse(self, text: str, name: str, error: type[Exception] = ValueError) -> Any:
        """A command-line value (``--set KEY=VALUE``) converted to the type, then checked."""
        value: Any = text
        try:
            if self.type == "int":
                value = int(text)
            elif self.type == "number":
                value = float(text)
            elif self.type == "bool":
                value = {"true": True, "false": False}[text.lower()]
        except (KeyError, ValueError):
            if self.type == "bool":
                raise error(f"{name} must be true or false, got {text!r}") from None
            raise error(f"{name} must be {'an integer' if self.type == 'int' else 'a number'}, "
                        f"got {text!r}") from None
        return self.check(value, name, error)


def _table(*settings: Setting) -> dict[str, Setting]:
    return {setting.name: setting for setting in settings}


BUDGET_SETTINGS = _table(
    Setting("model", "str", "child model: wrn (images) or gpt (text)"),
    Setting("width", "int", "widening factor k of the WRN-10-k child (wrn only; default 2)",
            low=1),
    Setting("dataset", "str", "dataset the space is meant for"),
    Setting("epochs", "int", "epochs per trial", low=1),
    Setting("train_examples", "int", "training examples (images) or tokens (text) per trial", low=1),
    Setting("validation_examples", "int", "hold-out taken from the training split", low=1),
    Setting("batch_size", "int", "minibatch size", low=1),
    Setting("lr", "number", "SGD (images) or AdamW (text) learning rate", low=0, low_open=True),
    Setting("weight_decay", "number", "weight decay", low=0),
    Setting("context", "int", "language-model context length, tokens", low=2),
    Setting("augment", "choice", "image augmentation of training batches", "none",
            choices=("none", "crop-flip")),
    Setting("recalibrate_bn", "bool", "re-estimate BatchNorm statistics with masks off before "
            "the final validation", False),
    Setting("eval_every", "int", "validate after every N-th epoch (and the last; under "
            "ASHA also at every rung)", 1, low=1),
)

CONTROLLER_SETTINGS = _table(
    Setting("architecture", "choice", "policy body", "transformer",
            choices=("transformer", "lstm")),
    Setting("hidden_size", "int", "policy width", 64, low=8),
    Setting("layers", "int", "policy layers", 1, low=1),
    Setting("heads", "int", "attention heads (transformer body)", 4, low=1),
    Setting("lr", "number", "Adam learning rate", 5e-4, low=0, low_open=True),
    Setting("entropy_weight", "number", "entropy bonus", 1e-3, low=0),
    Setting("baseline_decay", "number", "moving-average baseline decay", 0.9, low=0, high=1),
    Setting("grad_clip", "number", "gradient-norm clip", 1.0, low=0, low_open=True),
    Setting("importance_clip", "number", "eps of the clipped importance weight", 0.2, low=0,
            low_open=True),
    Setting("update_every", "int", "rewards per policy update", 1, low=1),
    Setting("reward", "choice", "the reward the space is designed for (informational: a "
            "classifier reports accuracy, a language model 80 / perplexity)",
            choices=("accuracy", "perplexity")),
)

CONTROLLER_DEFAULTS: dict[str, Any] = {
    name: setting.default for name, setting in CONTROLLER_SETTINGS.items()
    if setting.default is not None
}
"""The RL controller's settings and their defaults; a space's ``controller:`` section and
``--set KEY=VALUE`` override them."""


def controller_table() -> str:
    """The Markdown table of controller settings that the README shows (a test keeps the
    README's copy equal to this)."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for name, default in CONTROLLER_DEFAULTS.items():
        setting = CONTROLLER_SETTINGS[name]
        rows.append(f"| `{name}` | {default:g} | {setting.doc} |" if setting.type != "choice"
                    else f"| `{name}` | {default} | {setting.doc}: `{'` or `'.join(setting.choices)}` |")
    return "\n".join(rows) + "\n"
