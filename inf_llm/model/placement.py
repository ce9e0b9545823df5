"""Where a layer computes, so that its InfLLM memory can live there (the memory shards with the model).

A model loaded with a `device_map` (accelerate) has each decoder layer on its own device. A layer that
accelerate offloads (to CPU or disk, while computing on a GPU) keeps its weights on the "meta" device between
forward passes and is moved in by a hook for each call: its memory belongs on the hook's execution device, not
on "meta". Without a hook, a layer computes where its weights are.
"""

from __future__ import annotations

import torch


def _hook_device(hook: object) -> torch.device | None:
    """accelerate's execution device of a hook (an `AlignDevicesHook`, or one inside a `SequentialHook`)."""
    if hook is None:
        return None
    for inner in getattr(hook, "hooks", ()):
        device = _hook_device(inner)
        if device is not None:
            return device
    device = getattr(hook, "execution_device", None)
    return None if device is None else torch.device(device)


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device `module` computes on: its accelerate hook's execution device, else the device of its first
    parameter (CPU if it has none)."""
    device = _hook_device(getattr(module, "_hf_hook", None))
    if device is not None:
        return device
    parameter = next(module.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def layer_device(layer: torch.nn.Module) -> torch.device:
    """The device of a decoder layer's attention, where its q, k, v are computed: a hook's execution device
    (on the layer, its attention or q_proj, whichever accelerate hooked), else q_proj's weight's device."""
    attention = layer.self_attn
    for part in (layer, attention, attention.q_proj):
        device = _hook_device(getattr(part, "_hf_hook", None))
        if device is not None:
            return device
    return attention.q_proj.weight.device
