"""The state dict's layout (DESIGN §9): torch's optimizer state dict, shaped so that
torch.distributed.checkpoint keeps it whole, and state dicts of the earlier layout read back.

Every parameter's entry holds every key it can ever hold, zeros standing in for those not made yet and
named (comma separated) under PLACEHOLDERS, present in every entry: DCP loads into the state dict of a
fresh optimizer, which must have the keys and shapes of a trained one. The optimizer's own entries (kind,
step count, diagnostics, KFAC's generator states) are in each param group under OWN_ENTRIES, since DCP keeps
only `state` and `param_groups`. State dicts saved before 2026-12-06 kept them at the top under LEGACY, with
no placeholders.
"""
from __future__ import annotations

import torch

OWN_ENTRIES = "fastfoof"
PLACEHOLDERS = "fastfoof_placeholders"
LEGACY = "foof"


def add_placeholders(state_dict: dict, params: list[torch.Tensor], templates: dict[torch.Tensor, dict]) -> None:
    """Every parameter's entry (`params`: all of them in their param groups' order, as torch numbers them)
    gains the keys of its `templates` that it lacks, as those zeros, and PLACEHOLDERS naming them (an empty
    string where none is missing)."""
    for i, p in enumerate(params):
        entry = state_dict["state"][i] = dict(state_dict["state"].get(i, {}))  # (torch's is the optimizer's)
        missing = [key for key in templates.get(p, {}) if key not in entry]
        entry.update({key: templates[p][key] for key in missing})
        entry[PLACEHOLDERS] = ",".join(missing)  # one string, present in every entry: DCP wants fixed keys


def add_own_entries(state_dict: dict, own: dict) -> None:
    for group in state_dict["param_groups"]:
        group[OWN_ENTRIES] = own


def split(state_dict: dict, kind: str) -> tuple[dict, dict]:
    """(torch's state dict without placeholders or own entries, the own entries) of a state dict that an
    optimizer of `kind` saved, in today's layout or the earlier one; ValueError for any other."""
    groups = [dict(group) for group in state_dict["param_groups"]]
    own = [group.pop(OWN_ENTRIES, None) for group in groups][0] if groups else None
    own = state_dict.get(LEGACY, own)
    if own is None:
        raise ValueError(f"state_dict: no '{OWN_ENTRIES}' entry in its param groups; {kind} loads only "
                         f"state dicts saved by {kind}.state_dict()")
    if own.get("kind", "FOOF") != kind:
        raise ValueError(f"state_dict: saved by {own['kind']}, not {kind}")
    state = {}
    for i, entry in state_dict["state"].items():
        entry = dict(entry)
        for key in filter(None, entry.pop(PLACEHOLDERS, "").split(",")):
            del entry[key]
        state[i] = entry
    return {"state": state, "param_groups": groups}, own
