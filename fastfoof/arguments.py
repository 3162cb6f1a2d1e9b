"""The optimizers' arguments, checked where they are given: ValueError naming the argument (DESIGN §5)."""
from __future__ import annotations

import numbers
import os

import torch
from torch import nn

from .linalg import INVERSE_METHODS

GRAFTS = (None, "sgd")  # an optimizer's step: grafted to SGD's norm per layer, or eq. 6 (DESIGN §1.4)

INVERSE_OVERRIDE = "FASTFOOF_INVERSE"  # an environment variable that, where set, overrides `inverse`


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_model_and_damping(model, damping) -> None:
    """ValueError for a model that is no nn.Module, or a damping that is no number > 0."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not (is_number(damping) and damping > 0):
        raise ValueError(f"damping: must be a number > 0, got {damping!r}")


def check_param_group(group: dict) -> None:
    """ValueError naming the first invalid SGD setting of a param group (DESIGN §1.4's epilogue)."""
    for name in ("lr", "momentum", "dampening", "weight_decay"):
        value = group[name]
        if not (is_number(value) or (isinstance(value, torch.Tensor) and value.numel() == 1)) or not value >= 0:
            raise ValueError(f"{name}: must be a number ≥ 0, got {value!r}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("nesterov: requires momentum > 0 and dampening = 0")


def check_statistics(ema_decay, inv_period, stats_steps, stats_batch) -> None:
    """ValueError for a running average or schedule DESIGN §1.2 and §1.5 do not define."""
    if not (is_number(ema_decay) and 0 <= ema_decay < 1):
        raise ValueError(f"ema_decay: must be a number in [0, 1), got {ema_decay!r}")
    if not (is_int(inv_period) and inv_period >= 1):
        raise ValueError(f"inv_period: must be an integer ≥ 1, got {inv_period!r}")
    if not (is_int(stats_steps) and 1 <= stats_steps <= inv_period):
        raise ValueError(f"stats_steps: must be an integer in [1, inv_period={inv_period}], got {stats_steps!r}")
    if stats_batch is not None and not (is_int(stats_batch) and stats_batch >= 1):
        raise ValueError(f"stats_batch: must be None or an integer ≥ 1, got {stats_batch!r}")


def check_preconditioning(rank, graft, inverse) -> None:
    """ValueError for a preconditioner's rank, grafting or inversion method that does not exist; the
    inversion method where FASTFOOF_INVERSE overrides it too."""
    if rank is not None and not (is_int(rank) and rank >= 1):
        raise ValueError(f"rank: must be None or an integer ≥ 1, got {rank!r}")
    if graft not in GRAFTS:
        raise ValueError(f"graft: expected one of {GRAFTS}, got {graft!r}")
    if inverse not in INVERSE_METHODS:
        raise ValueError(f"inverse: expected one of {INVERSE_METHODS}, got {inverse!r}")
    override = os.environ.get(INVERSE_OVERRIDE)
    if override and override not in INVERSE_METHODS:
        raise ValueError(f"inverse: the environment's {INVERSE_OVERRIDE}={override!r} is none of {INVERSE_METHODS}")


def inverse_method(inverse: str) -> str:
    """The inversion method a round runs: FASTFOOF_INVERSE where it is set, else the optimizer's `inverse`."""
    return os.environ.get(INVERSE_OVERRIDE) or inverse
