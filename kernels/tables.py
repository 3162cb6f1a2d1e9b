"""Small host-built tables (pointers, offsets, scalars) that kernels read on the device, and the plans
that hold them between calls."""
from __future__ import annotations

import weakref
from collections import Counter

import torch


def to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`table` (built on the host) on `device`, copied without a host synchronisation."""
    if device.type == "cpu":
        return table
    # Pinned staging makes the copy asynchronous; torch's host allocator keeps it alive until done.
    return table.pin_memory().to(device, non_blocking=True)


def column(columns: tuple[str, ...], name: str, loaded_with: str | None = None) -> int:
    """The index of column `name` of a table whose rows are `columns`: how kernels address it, so that
    every offset derives from the one tuple. `loaded_with`: the column a kernel loads together with it in
    one vector load of a pair, which must follow it at an even index (a 16-byte-aligned pair of int64s)."""
    index = columns.index(name)
    if loaded_with is not None and (index % 2 or columns[index + 1:index + 2] != (loaded_with,)):
        raise ValueError(f"columns {name!r} and {loaded_with!r} must be a pair at an even index of {columns}")
    return index


class Plans:
    """The kernel plans of one owner (an optimizer, through `fastfoof.ops`): device tables, constants,
    workspaces and copies derived from a tensor, each built once and kept while the host key it was built
    for holds. Two optimizers on one device (a GAN's generator and discriminator, a teacher and a student)
    each keep their own, where one module-wide slot per device would rebuild and re-upload them at every
    alternation. A kernel called without plans builds what it needs for that call alone.

    `builds` counts the builds of each entry by its name (tables, constants, workspaces, derived copies)."""

    def __init__(self):
        self._entries: dict[tuple, tuple[object, object]] = {}
        self.builds: Counter = Counter()

    def get(self, name: tuple, key, build):
        """The entry `name`: what `build()` returned for `key`, built again when the key changed."""
        held = self._entries.get(name)
        if held is not None and held[0] == key:
            return held[1]
        value = build()
        self._entries[name] = (key, value)
        self.builds[name] += 1
        return value

    def table(self, name: tuple, key, build, device: torch.device) -> torch.Tensor:
        """A host-built table (`build()`) on `device`, rebuilt (one asynchronous copy) when `key` changed."""
        return self.get(name, key, lambda: to_device(build(), device))

    def constant(self, value: float, device: torch.device) -> torch.Tensor:
        """An fp32 scalar on `device` (the grad scale 1 and found_inf 0 without a GradScaler)."""
        return self.get(("constant", value, device), None, lambda: torch.full((), value, dtype=torch.float32,
                                                                              device=device))

    def workspace(self, name: tuple, device: torch.device, elements: int) -> torch.Tensor:
        """An fp32 buffer of at least `elements`, grown as needed (callers keep offsets into it, never its
        address, so a grown workspace leaves their tables valid)."""
        held = self._entries.get(name)
        if held is not None and held[1].numel() >= elements:
            return held[1]
        return self.get(name, elements, lambda: torch.empty(elements, dtype=torch.float32, device=device))

    def derived(self, name: str, source: torch.Tensor, key, build) -> torch.Tensor:
        """`build()`, a tensor made from `source`, kept until `source` dies, changes in place (its version)
        or `key` changes: at most one copy per source and version."""
        entry = (name, id(source))
        held = self._entries.get(entry)
        if held is not None:
            alive, version, built_for = held[0]
            if alive() is source and version == source._version and built_for == key:
                return held[1]
        entries = self._entries  # the callback must not hold the plans
        value = build()
        entries[entry] = ((weakref.ref(source, lambda _: entries.pop(entry, None)), source._version, key), value)
        self.builds[entry] += 1
        return value

    def key(self, name: tuple):
        """The host key the entry `name` was built for (None if there is none)."""
        held = self._entries.get(name)
        return None if held is None else held[0]

    def held(self, name: tuple):
        """The entry `name` as it was built (None if there is none)."""
        held = self._entries.get(name)
        return None if held is None else held[1]

    def names(self) -> list[tuple]:
        """The names of the entries held."""
        return list(self._entries)
