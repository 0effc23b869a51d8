"""A tuning space: every combination of one setting per factor, walked by one-key moves.

A backend builds its space from the spaces its kernel templates declare next to themselves: each factor is
the list of valid settings of its own keys (a stage's block size x warps x pipeline stages, say, already
filtered by the constraints between them), and factors share no keys, so any combination of settings is a
valid config. The space is never listed: its size is the product of the factor sizes, membership is checked
factor by factor, and the sweep moves through it one key at a time (`moves`), so a product of millions
costs only the sum of its axes per search round. A key whose change pays only together with another's (more
CTAs per SM need smaller tiles to fit) names those keys in `linked`: its moves also change one of them. A key
that picks between schedules (which kernels run) names, per value, the keys of the kernels that value leaves
out in `inactive`: while it has that value, moves of theirs would time the same kernels again, and `moves`
leaves them out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator


def config_key(config: dict) -> tuple:
    """A hashable identity of a config (order of keys does not matter; repr keeps 16 apart from 16.0 and True
    apart from 1, so a config matches only with exactly its values)."""
    return tuple(sorted((k, repr(v)) for k, v in config.items()))


class Space:
    """The product of `factors` (each an iterable of dicts over its own keys). `order` lists the keys that
    `moves` tries first (the settings that matter most, so a sweep cut short by its budget has tried them);
    the rest follow in factor order. `linked` maps a key to keys of its own factor that its moves may change
    with it, one at a time. `inactive` maps a key to {value: keys that do not matter while it has that value}."""

    def __init__(self, *factors: Iterable[dict], order: Iterable[str] = (),
                 linked: dict[str, Iterable[str]] | None = None,
                 inactive: dict[str, dict[object, Iterable[str]]] | None = None):
        self.factors = tuple(tuple(dict(setting) for setting in factor) for factor in factors)
        seen: set[str] = set()
        for number, factor in enumerate(self.factors):
            if not factor:
                raise ValueError(f"Space: factor {number} has no settings")
            keys = set(factor[0])
            if any(set(setting) != keys for setting in factor):
                raise ValueError(f"Space: the settings of factor {number} do not all have the keys {sorted(keys)}")
            if keys & seen:
                raise ValueError(f"Space: keys {sorted(keys & seen)} appear in more than one factor")
            seen |= keys
        factor_order = [k for factor in self.factors for k in factor[0]]
        order = [k for k in order if k in seen]
        self.keys = tuple(dict.fromkeys([*order, *factor_order]))
        self._factor_of = {k: i for i, factor in enumerate(self.factors) for k in factor[0]}
        self.linked = {key: tuple(others) for key, others in (linked or {}).items()}
        for key, others in self.linked.items():
            if key not in seen or any(self._factor_of.get(other) != self._factor_of[key] for other in others):
                raise ValueError(f"Space: linked keys {key!r} -> {list(others)} are not keys of one factor")
        self._members = [{config_key(setting) for setting in factor} for factor in self.factors]
        self.inactive = {key: {value: frozenset(keys) for value, keys in by_value.items()}
                         for key, by_value in (inactive or {}).items()}
        for key, by_value in self.inactive.items():
            unknown = set().union(*by_value.values()) - seen
            if key not in seen or unknown:
                raise ValueError(f"Space: inactive keys {sorted(unknown)} of {key!r} are not keys of the space"
                                 if unknown else f"Space: inactive keys of {key!r}, which is not a key of the space")

    @classmethod
    def of(cls, space) -> Space:
        """`space` itself, or a Space of one factor holding the listed configs."""
        return space if isinstance(space, Space) else cls(list(space))

    def __len__(self) -> int:
        return math.prod(len(factor) for factor in self.factors)

    def __iter__(self) -> Iterator[dict]:
        for settings in itertools.product(*self.factors):
            yield {k: v for setting in settings for k, v in setting.items()}

    def _part(self, config: dict, number: int) -> dict:
        return {k: config[k] for k in self.factors[number][0]}

    def __contains__(self, config) -> bool:
        if not isinstance(config, dict) or set(config) != set(self.keys):
            return False
        return all(config_key(self._part(config, n)) in members for n, members in enumerate(self._members))

    def first(self, key: str):
        """The value of `key` in the first setting of its factor (of a schedule switch: the schedule that configs
        from before the switch ran)."""
        return self.factors[self._factor_of[key]][0][key]

    def ignored(self, config: dict) -> frozenset[str]:
        """The keys whose values do not matter in `config` (`inactive`)."""
        return frozenset().union(*(self.inactive[key].get(config[key], ()) for key in self.inactive))

    def moves(self, config: dict) -> list[dict]:
        """The configs of the space that differ from `config` (a member) in exactly one key, by key in
        `self.keys` order, then in the order of the factor's settings; after a linked key's, those that also
        differ in one of its linked keys. None that differs only in keys `config` ignores."""
        found = []
        ignored = self.ignored(config)
        for key in self.keys:
            if key in ignored:
                continue
            number = self._factor_of[key]
            part = self._part(config, number)
            changed = [setting for setting in self.factors[number] if setting[key] != part[key]]
            found.extend({**config, **setting} for setting in changed
                         if all(setting[k] == part[k] for k in part if k != key))
            for other in self.linked.get(key, ()):
                found.extend({**config, **setting} for setting in changed if setting[other] != part[other]
                             and all(setting[k] == part[k] for k in part if k not in (key, other)))
        return found
