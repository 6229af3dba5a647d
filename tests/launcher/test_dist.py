"""Collective placement helpers without a process group."""

from __future__ import annotations

import torch

from launcher.dist import SIMULATED_DEVICE_ENV, device_label, on_device


def test_on_device_keeps_a_tensor_already_there():
    t = torch.ones(3)
    assert on_device(t, torch.device("cpu")) is t
    assert device_label(t) == "cpu"


def test_simulated_accelerator_tags_a_copy(monkeypatch):
    monkeypatch.setenv(SIMULATED_DEVICE_ENV, "sim:0")
    t = torch.ones(3)
    placed = on_device(t, torch.device("cpu"))
    assert placed is not t and torch.equal(placed, t)
    assert device_label(placed) == "sim:0" and device_label(t) == "cpu"
