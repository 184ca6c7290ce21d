"""Smoothing groups found from the model itself, for any decoder the table does not list.

Which linears read the same tensor, and what produced it, is a question the model can answer:

1. Find the decoder stack: the ModuleList that holds most of the model's linear weights.
2. Run a few random tokens through the model once and keep each block's call (hooks, no tracing).
3. On a float64 copy of the first block of each structure (hybrid stacks have several), perturb
   every candidate producer in turn and see which linears' inputs are scaled by it, and how
   (perturb.py: grouped-query v -> o mappings, routed experts and router-prescaled inputs need no
   knowledge of the model's code).
4. Prove each candidate group (folds.fold_error) and keep only those whose fold leaves the block's
   output unchanged to FOLD_TOLERANCE; a norm feeding the residual stream or a consumer that the
   perturbation missed makes the proof fail, and the report says so with the measured error.

Linears that end in no group are quantized unsmoothed, and the report says why (e.g. OLMo 2's
q/k/v read the raw residual stream: nothing in the block produces their input).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..core.record import record
from .arch import Arch, Group, UnsupportedArchError, bind, block_signature, expand
from .folds import LINEAR_TYPES, BlockCall, weight_nk
from .moe import split_fused_experts, split_modules
from .perturb import GroupFinding, discover_block, expert_role

TRACE_TOKENS = 16


class DiscoveryError(UnsupportedArchError):
    """The model offers nothing discovery can work with (no decoder stack, a stack its forward never calls)."""


# ---------------------------------------------------------------------------------------------
# the decoder stack and the structure of its blocks


def _weight_numel(module: nn.Module) -> int:
    return sum(
        m.weight.numel()
        for m in module.modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.dim() >= 2
        and not isinstance(m, nn.Embedding)
    )


def candidate_stacks(model: nn.Module) -> list[str]:
    """Dotted paths of the ModuleLists whose every element holds linear weights, most weights first:
    the decoder stack is the first one the model's forward calls (a multimodal wrapper's vision tower
    may hold more weights, but a text forward never calls it)."""
    sizes = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and name and all(_weight_numel(b) > 0 for b in module):
            sizes.append((_weight_numel(module), name))
    return [name for _, name in sorted(sizes, key=lambda t: -t[0])]


def find_layers(model: nn.Module) -> str:
    """Dotted path of the ModuleList of decoder blocks: the one holding most linear weights."""
    stacks = candidate_stacks(model)
    if not stacks:
        raise DiscoveryError(
            f"{type(model).__name__} has no recognisable decoder stack (no nn.ModuleList of blocks holding linear "
            "weights). Describe it with smoothq.archs.register(model_type, Arch(layers='path.to.blocks', groups=...))"
        )
    return stacks[0]


def expert_lists(block: nn.Module) -> dict[str, int]:
    """Block-relative paths of expert containers (split MoE experts or ModuleLists of same-class
    modules that hold linears) -> their number of experts."""
    out = {name: len(module) for name, module in split_modules(block)}
    for name, module in block.named_modules():
        if name in out:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and any(isinstance(x, LINEAR_TYPES) for m in module for x in m.modules()):
                out[name] = len(module)
    return out


def routers(block: nn.Module) -> list[str]:
    """Block-relative names of the linears that route tokens to experts: an nn.Linear beside an
    expert container (not inside it) with one output per expert. They stay in float (a quantized
    router picks other experts)."""
    found = []
    lists = expert_lists(block)
    for path, n_experts in lists.items():
        parent = path.rpartition(".")[0]
        scope = block.get_submodule(parent) if parent else block
        for rel, module in scope.named_modules():
            full = f"{parent}.{rel}" if parent else rel
            if any(full == p or full.startswith(f"{p}.") for p in lists):
                continue
            if isinstance(module, LINEAR_TYPES) and weight_nk(module).shape[0] == n_experts:
                found.append(full)
    return sorted(set(found))


# ---------------------------------------------------------------------------------------------
# tracing the model's calls of its blocks


class _Enough(Exception):
    """Raised by the last needed block's hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def trace_block_calls(
    model: nn.Module, layers: str, tokens: int = TRACE_TOKENS, seed: int = 0, needed: list[int] | None = None
) -> list[BlockCall | None]:
    """One short forward pass of random tokens; each decoder block's call (args, kwargs), detached.
    With `needed`, the pass stops at the last needed block (the rest of the model never runs)."""
    blocks = model.get_submodule(layers)
    calls: list[BlockCall | None] = [None] * len(blocks)
    last = max(needed) if needed else None

    def make_hook(i):
        def hook(_module, args, kwargs):
            if calls[i] is None:
                calls[i] = BlockCall(_detach(args), _detach(kwargs))
            if i == last:
                raise _Enough

        return hook

    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or _embedding_rows(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(3, vocab - 1), vocab, (1, tokens), generator=gen)
    device = next(model.parameters()).device
    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        model(input_ids=ids.to(device), use_cache=False)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


def _embedding_rows(model: nn.Module) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.weight.shape[0]) if emb is not None else 256


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detach(o) for o in obj)
    if isinstance(obj, list):
        return [_detach(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------
# the whole model: an Arch, and the report `smoothq archs` prints


@dataclass
class GroupRow:
    """One smoothing group of one block structure, as `smoothq archs` reports it."""

    structure: str  # block signature
    prev: str  # block-relative (may hold '*' for every expert)
    linears: tuple[str, ...]
    source: str  # "table" or "discovered"
    error: float  # measured fold error (float64, relative); nan = not measured
    option: str = ""
    used: bool = True  # False: rejected by the check (error > FOLD_TOLERANCE)


@dataclass
class Discovery:
    """What smoothq knows of a model's architecture and how it knows it."""

    arch: object  # archs.Arch
    source: str  # "table" or "discovered"
    structures: dict[str, list[int]] = field(default_factory=dict)  # signature -> block indices
    rows: list[GroupRow] = field(default_factory=list)
    unsmoothed: dict[str, dict[str, str]] = field(default_factory=dict)  # signature -> linear -> why
    routers: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def max_error(self) -> float:
        used = [r.error for r in self.rows if r.used and r.error == r.error]
        return max(used, default=0.0)

    def to_dict(self) -> dict:
        return {
            "arch": self.arch.name,
            "layers": self.arch.layers,
            "source": self.source,
            "structures": {k: v for k, v in self.structures.items()},
            "groups": [
                {
                    "structure": r.structure,
                    "prev": r.prev,
                    "linears": list(r.linears),
                    "source": r.source,
                    "fold_error": r.error if r.error == r.error else None,
                    "option": r.option,
                    "used": r.used,
                }
                for r in self.rows
            ],
            "unsmoothed": self.unsmoothed,
            "routers": list(self.routers),
            "max_fold_error": self.max_error,
            "seconds": round(self.seconds, 3),
        }

    def register_code(self) -> str:
        """Python that pins this description in the table (paste it before quantizing)."""
        arch = self.arch

        def group_code(g) -> str:
            extra = ""
            if g.option:
                extra += f", option={g.option!r}"
            if g.heads:
                extra += f", heads={g.heads!r}"
            if g.index is not None:
                extra += f", index={tuple(g.index)!r}"
            if g.norm_offset is not None and g.norm_offset != arch.norm_offset:
                extra += f", norm_offset={g.norm_offset!r}"
            return f"Group({g.prev!r}, {tuple(g.linears)!r}{extra})"

        lines = ["from smoothq.archs import Arch, Group, register", f"register({arch.name!r}, Arch("]
        lines.append(f"    layers={arch.layers!r},")
        if arch.block_groups and len(arch.block_groups) > 1:
            lines.append("    groups=(),")
            lines.append("    block_groups=(")
            for sig, groups in arch.block_groups:
                lines.append(f"        ({sig!r}, (")
                lines += [f"            {group_code(g)}," for g in groups]
                lines.append("        )),")
            lines.append("    ),")
        else:
            groups = arch.block_groups[0][1] if arch.block_groups else arch.groups
            lines.append("    groups=(")
            lines += [f"        {group_code(g)}," for g in groups]
            lines.append("    ),")
        if arch.norm_offset:
            lines.append(f"    norm_offset={arch.norm_offset!r},")
        if arch.keep_float:
            lines.append(f"    keep_float={arch.keep_float!r},")
        if arch.online_rotation:
            lines.append(f"    online_rotation={arch.online_rotation!r},")
        lines.append("))")
        return "\n".join(lines)


def collapse_findings(findings: list[GroupFinding], block: nn.Module, norm_offset: float) -> list:
    """Findings as table Groups, the copies of one expert projection written once with '*'
    (only where the pattern expands to exactly the found names)."""
    groups, seen = [], set()
    for f in findings:
        prev = expert_role(f.prev)
        linears = tuple(dict.fromkeys(expert_role(c) for c in f.linears))
        key = (prev, linears, f.option)
        if "*" in prev or any("*" in c for c in linears):
            if key in seen:
                continue
            candidate = Group(
                prev,
                linears,
                option=f.option,
                heads=f.heads,
                index=None if f.index is None or f.heads else tuple(int(i) for i in f.index),
                norm_offset=None if f.option or f.norm_offset == norm_offset else f.norm_offset,
            )
            # consumers compared as sets: a group's scale is a max over its linears, in any order
            expanded = {(p, frozenset(n for pat in ls for n in expand(block, pat))) for p, ls in bind(block, candidate)}
            wanted = {
                (g.prev, frozenset(g.linears)) for g in findings if expert_role(g.prev) == prev and g.option == f.option
            }
            if expanded == wanted:
                seen.add(key)
                groups.append(candidate)
                continue
        groups.append(
            Group(
                f.prev,
                tuple(f.linears),
                option=f.option,
                heads=f.heads,
                index=None if f.index is None or f.heads else tuple(int(i) for i in f.index),
                norm_offset=None if f.option or f.norm_offset == norm_offset else f.norm_offset,
            )
        )
    return groups


def block_structures(layers: nn.ModuleList) -> dict[str, list[int]]:
    """Block signature -> the indices of the blocks of that structure."""
    out: dict[str, list[int]] = {}
    for i, block in enumerate(layers):
        out.setdefault(block_signature(block), []).append(i)
    return out


def _is_weightless(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def structure_arch(model: nn.Module, layers: str | None = None, split: bool = True):
    """The structure-only description of a model the table does not list: its decoder stack, its
    routers and the linears a saved checkpoint says stay in float (config `smoothq.keep_float`);
    no groups (those need the weights). `split=False` leaves the model's fused experts as they are
    (a weightless skeleton about to load fused checkpoint tensors) and looks at split copies."""
    config = getattr(model, "config", None)
    saved = getattr(config, "smoothq", None) or {}  # what a saved checkpoint says of its discovered model
    layers = layers or saved.get("layers") or find_layers(model)
    blocks = model.get_submodule(layers)
    keep: list[str] = list(saved.get("keep_float", ()))
    seen: set = set()
    for block in blocks:
        if not split:
            key = tuple(n for n, _ in block.named_modules())
            if key in seen:
                continue
            seen.add(key)
            block = copy.deepcopy(block)
        split_fused_experts(block)
        keep += routers(block)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    return Arch(layers=layers, groups=(), keep_float=tuple(dict.fromkeys(keep)), name=model_type, discovered=True)


def discover_arch(model: nn.Module, *, refresh: bool = False) -> Discovery:
    """Discover (once per model, kept in its record) the smoothing groups of a model the table
    does not list. Weightless or quantized models get the structure only (structure_arch)."""
    rec = record(model)
    if rec.discovery is not None and not refresh:
        return rec.discovery
    if _is_weightless(model) or rec.scheme is not None:
        arch = structure_arch(model, split=False)
        return Discovery(arch=arch, source="discovered", structures=block_structures(model.get_submodule(arch.layers)))
    found = discover(model)
    rec.discovery = found
    return found


@torch.no_grad()
def discover(model: nn.Module, layers: str | None = None, seed: int = 0) -> Discovery:
    """Find, prove and describe every smoothing group of the model (see the module docstring)."""
    start = time.perf_counter()
    for stack in [layers] if layers else candidate_stacks(model) or [None]:
        base = structure_arch(model, stack)
        blocks = model.get_submodule(base.layers)
        structures = block_structures(blocks)
        calls = trace_block_calls(model, base.layers, seed=seed, needed=[v[0] for v in structures.values()])
        if all(calls[v[0]] is not None for v in structures.values()):
            break  # the stack the forward runs through
    block_groups, rows, unsmoothed, online = [], [], {}, []
    offsets: list[float] = []
    for sig, members in structures.items():
        i = members[0]
        if calls[i] is None:
            raise DiscoveryError(
                f"{base.layers}.{i} was never called in a forward pass: the decoder stack is not "
                f"{base.layers!r}. Register the architecture (smoothq.archs.register)"
            )
        found = discover_block(blocks[i], calls[i], seed=seed)
        offsets += [g.norm_offset for g in found.groups if g.option == ""]
        block_groups.append((sig, found))
    norm_offset = max(set(offsets), key=offsets.count) if offsets else 0.0
    arch_groups = []
    for sig, found in block_groups:
        block = blocks[structures[sig][0]]
        groups = tuple(collapse_findings(found.groups, block, norm_offset))
        arch_groups.append((sig, groups))
        for g in groups:
            err = max(
                (f.error for f in found.groups if expert_role(f.prev) == expert_role(g.prev)), default=float("nan")
            )
            rows.append(GroupRow(sig, g.prev, tuple(g.linears), "discovered", err, g.option))
            if g.option == "mlp_updown":
                online += [c for c in g.linears if c not in online]
        for f in found.rejected:
            rows.append(GroupRow(sig, f.prev, tuple(f.linears), "discovered", f.error, f.option, used=False))
        unsmoothed[sig] = found.unsmoothed
        base = replace(base, keep_float=tuple(dict.fromkeys(base.keep_float + tuple(found.not_called))))
    arch = Arch(
        layers=base.layers,
        groups=(),
        norm_offset=norm_offset,
        keep_float=base.keep_float,
        online_rotation=tuple(online),
        name=base.name,
        block_groups=tuple(arch_groups),
        discovered=True,
    )
    return Discovery(
        arch=arch,
        source="discovered",
        structures=structures,
        rows=rows,
        unsmoothed=unsmoothed,
        routers=base.keep_float,
        seconds=time.perf_counter() - start,
    )
