"""Optimizer parameter groups as S4 trains them.

SSM parameters carry their hints on the tensor itself (``param._optim = {"lr": ..., "weight_decay": 0.0}``,
set by ``SSMLayer.register_ssm``); this module is the one place that reads them.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_positive


def param_groups(model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Split ``model``'s trainable parameters into optimizer groups.

    Parameters without hints get (lr, weight_decay); hinted ones (the SSM parameters: Lambda, P, B, dt) form
    one group per distinct hint, with the hint's lr (default ``lr``) and weight decay (0 by default).

    Returns:
        A list of dicts for ``torch.optim.AdamW`` (or any optimizer taking parameter groups).
    """
    check_positive("lr", lr)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
    default: list[nn.Parameter] = []
    hinted: dict[tuple, list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        hint = getattr(p, "_optim", None)
        if hint is None:
            default.append(p)
        else:
            hinted.setdefault(tuple(sorted(hint.items())), []).append(p)
    groups = []
    if default:
        groups.append({"params": default, "lr": lr, "weight_decay": weight_decay})
    for key, params in hinted.items():
        hint = dict(key)
        groups.append(
            {"params": params, "lr": hint.get("lr", lr), "weight_decay": hint.get("weight_decay", 0.0)}
        )
    return groups


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, lr=lr, weight_decay=weight_decay)``."""
    return torch.optim.AdamW(param_groups(model, lr=lr, weight_decay=weight_decay), betas=betas)
