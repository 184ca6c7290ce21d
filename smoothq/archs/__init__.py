"""Architecture knowledge: which module feeds which linears, and where the decoder blocks are.

  arch.py      what an architecture is, as data (`Arch`, `Group`, `OPTIONS`, `check_options`), the
               recipes it can run (`Arch.check_recipe`), and its names bound to one block
  table.py     the curated, reviewed table (`ARCHS`, `register`, `table_arch`)
  folds.py     the proof: every group, from the table or discovered, is folded with random scales
               into a float64 copy of one block and the block's output compared before it is used
  experts.py   the per-expert modules fused experts are split into
  moe.py       fused 3-D mixture-of-experts parameters split into one nn.Linear per expert projection
  perturb.py   the smoothing groups of one block, found by perturbing each producer
  discover.py  smoothing groups found from the model itself (a short traced forward and the
               perturbation of one block per structure), for any decoder the table does not list
  resolve.py   `arch_for` (the table's entry, else discovery) and `resolve`, which binds an `Arch`
               to a concrete model
  prove.py     every group of an Arch proven on the model (`prove_arch`), and `describe`, the
               report `smoothq archs` prints
  config_fields.py, shrink.py, tiny.py   tiny random models of any causal-LM type (tests, benchmarks)

Each module imports only those listed above it (shrink.py: config_fields.py; tiny.py: shrink.py).
May import: torch, transformers, smoothq.core. Nothing above it (transforms, runtime, formats, ...).
"""

from .arch import OPTIONS, Arch, Group, Rotation, UnsupportedArchError, check_options, expand
from .folds import LINEAR_TYPES, in_features, weight_nk
from .resolve import Resolved, ResolvedGroup, arch_for, resolve
from .table import ARCHS, register, supported

__all__ = [
    "ARCHS",
    "LINEAR_TYPES",
    "OPTIONS",
    "Arch",
    "Group",
    "Resolved",
    "ResolvedGroup",
    "Rotation",
    "UnsupportedArchError",
    "arch_for",
    "check_options",
    "expand",
    "in_features",
    "register",
    "resolve",
    "supported",
    "weight_nk",
]
