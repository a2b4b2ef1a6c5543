"""Optimizer parameter groups as S4 trains them.

The hints live on the layers, keyed by parameter name (``SSMLayer.optimizer_hints()``: Lambda, P, B, dt get
the layer's ``ssm_lr`` and ``ssm_weight_decay``), so they survive every route that makes new Parameter
objects: ``copy.deepcopy``, ``load_state_dict(assign=True)``, ``to_empty``, ``.to("meta")``, Hugging Face
``from_pretrained``, FSDP2 ``fully_shard``. Any other parameter may carry a hint of its own as an attribute
(``param._optim = {"lr": ..., "weight_decay": ...}``). This module is the one place that reads them.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_real


def _module_hints(model: nn.Module) -> dict[int, tuple[str, dict]]:
    """id(parameter) -> (qualified name, hint) for every hinted parameter of every SSM layer in ``model``."""
    hints: dict[int, tuple[str, dict]] = {}
    for prefix, module in model.named_modules():
        get = getattr(module, "optimizer_hints", None)
        if not callable(get):
            continue
        for name, hint in get().items():
            owner, _, leaf = name.rpartition(".")  # a dotted name reaches into a submodule ("dt_proj.bias")
            try:
                p = getattr(module.get_submodule(owner) if owner else module, leaf, None)
            except AttributeError:
                p = None
            if isinstance(p, torch.Tensor):
                hints[id(p)] = (f"{prefix}.{name}" if prefix else name, hint)
    return hints


def param_groups(model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Split ``model``'s trainable parameters into optimizer groups.

    Parameters without hints get (lr, weight_decay); hinted ones (the SSM parameters: Lambda, P, B, dt) form
    one group per distinct hint, with the hint's lr (default ``lr``) and weight decay (0 by default).

    Raises:
        ValueError: non-finite or negative ``lr`` / ``weight_decay``; or the model holds SSM layers whose
            hinted parameters are not among ``model.parameters()`` (FSDP1 flat parameters: wrap with
            ``use_orig_params=True``, or build the groups before wrapping), instead of silently giving them
            the global settings.

    Returns:
        A list of dicts for ``torch.optim.AdamW`` (or any optimizer taking parameter groups).
    """
    lr = check_real("lr", lr, positive=True)
    weight_decay = check_real("weight_decay", weight_decay, minimum=0.0)
    hints = _module_hints(model)
    params = list(model.parameters())
    seen = {id(p) for p in params}
    missing = [name for key, (name, _) in hints.items() if key not in seen]
    if missing:
        raise ValueError(
            f"the SSM parameters {missing[:4]}{'...' if len(missing) > 4 else ''} carry optimizer hints but "
            "are not among model.parameters() (flattened, e.g. by FSDP1 without use_orig_params=True): build "
            "the parameter groups before wrapping, or wrap with use_orig_params=True"
        )
    default: list[nn.Parameter] = []
    hinted: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        if not p.requires_grad:
            continue
        hint = hints[id(p)][1] if id(p) in hints else getattr(p, "_optim", None)
        if hint is None:
            default.append(p)
        else:
            hinted.setdefault(tuple(sorted(hint.items())), []).append(p)
    groups = []
    if default:
        groups.append({"params": default, "lr": lr, "weight_decay": weight_decay})
    for key, ps in hinted.items():
        hint = dict(key)
        groups.append({"params": ps, "lr": hint.get("lr", lr), "weight_decay": hint.get("weight_decay", 0.0)})
    return groups


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, lr=lr, weight_decay=weight_decay)``."""
    return torch.optim.AdamW(param_groups(model, lr=lr, weight_decay=weight_decay), betas=betas)
