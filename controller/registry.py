"""The controllers a search can run, by name: ``rl`` (the paper's REINFORCE policy) and
``random`` (the baseline to beat); and the trial schedulers: ``none`` (every trial gets the
whole budget) and ``asha`` (Ray Tune's asynchronous successive halving). Listing them
imports no torch and no Ray, so the CLI builds its ``--controller`` and ``--scheduler``
choices from :data:`CONTROLLERS` and :data:`SCHEDULERS`."""

from __future__ import annotations

from autodropout.registry import Registry

CONTROLLERS = Registry("--controller", {
    "rl": "controller.controllers:RLController",
    "random": "controller.controllers:RandomController",
})

SCHEDULERS = Registry("--scheduler", {
    "none": "ray.tune.schedulers:FIFOScheduler",
    "asha": "ray.tune.schedulers:ASHAScheduler",
})

ASHA_DEFAULTS = {"asha_grace": 1, "asha_reduction": 3.0}
"""``--asha-grace`` (epochs every trial gets before ASHA may stop it) and
``--asha-reduction`` (the factor between rungs; about 1/F of the trials at a rung go on)."""
