"""The controllers a search can run, by name: ``rl`` (the paper's REINFORCE policy) and
``random`` (the baseline to beat). Listing them imports no torch, so the CLI builds its
``--controller`` choices from :data:`CONTROLLERS`."""

from __future__ import annotations

from autodropout.registry import Registry

CONTROLLERS = Registry("--controller", {
    "rl": "controller.controllers:RLController",
    "random": "controller.controllers:RandomController",
})
