"""The adapter lifecycle: the registry (versions, leases, loads, unloads) and its parts: tiers
(page-ins, pins), merges (state, eligibility, transitions, the policy), the lazy resolver in
front of it; validation and snapshots below it."""

from serve.adapters.merges import Merges
from serve.adapters.registry import AdapterRegistry, Entry, Version
from serve.adapters.resolver import LazyResolver
from serve.adapters.tiers import Tiers

__all__ = ["AdapterRegistry", "Entry", "LazyResolver", "Merges", "Tiers", "Version"]
