"""Architecture knowledge: which module feeds which linears, and where the decoder blocks are.

  table.py     the curated, reviewed table (`ARCHS`, `Arch`, `Group`, `register`) and `resolve`,
               which binds an `Arch` to a concrete model
  discover.py  smoothing groups found from the model itself (a short traced forward and a
               perturbation per producer), for any decoder the table does not list
  folds.py     the proof: every group, from the table or discovered, is folded with random scales
               into a float64 copy of one block and the block's output compared before it is used
  moe.py       fused 3-D mixture-of-experts parameters split into one nn.Linear per expert projection

May import: torch, transformers, smoothq.core.record. Nothing above it (transforms, runtime, formats, ...).
"""

from .table import (ARCHS, LINEAR_TYPES, OPTIONS, Arch, Group, Resolved, ResolvedGroup, Rotation,
                    UnsupportedArchError, _expand, arch_for, check_options, in_features, register, resolve,
                    supported, weight_nk)

__all__ = ["ARCHS", "LINEAR_TYPES", "OPTIONS", "Arch", "Group", "Resolved", "ResolvedGroup", "Rotation",
           "UnsupportedArchError", "arch_for", "check_options", "in_features", "register", "resolve", "supported",
           "weight_nk"]
