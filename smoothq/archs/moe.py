"""Split fused mixture-of-experts parameters into one nn.Linear per expert projection.

transformers >= 5 stores the experts of most MoE models as 3-D parameters ([E, out, in], or
[E, in, out] where `is_transposed`) with no per-expert modules. SmoothQuant needs per-expert
linears: to observe each expert's own inputs (down_proj sees only its tokens) and to swap each
one for a W8A8Linear. `split_fused_experts` replaces every fused experts module by a drop-in that
holds the same weights as nn.Linear leaves named `<path>.<e>.gate_proj`, `.up_proj`, `.down_proj`
(as in per-expert checkpoints) and computes what the fused module's eager forward computes.

Which fused layouts are understood is a table (`LAYOUTS`), one entry per layout:

  transformers  every class decorated with `transformers.integrations.moe.use_experts_implementation`
                (~60 model types): the decorator records the layout as data (has_gate, has_bias,
                is_transposed, is_concatenated, has_post_expert_norm) and the gate as a method
                (`_apply_gate`), the contract every experts backend of transformers computes. The
                split calls the module's own `_apply_gate` on the gate/up outputs re-assembled in
                the fused order, so custom activations (gpt-oss's clamped SwiGLU, ...) are exact
                by construction.
  ergo          ErgoExperts: decorated, but its own forward adds one RMSNorm weight per expert
                after each route (post_expert_norm(y, expert_ids)).
  llama4        Llama4TextExperts: runs every expert on every token of router-prescaled input.
  dbrx          DbrxExperts: 2-D w1/v1/w2 of [E * F, H] each.
  inkling_shared  InklingSharedExperts: 3-D shared experts, every token through each, down_proj
                input scaled by a per-token gamma.
  parallel      JetMoeParallelExperts: one projection per expert (input_linear / output_linear),
                forward(inputs, expert_size) on expert-sorted rows: each expert one `<e>.proj`.

A module with 3-D expert parameters in any other layout raises UnsupportedArchError: smoothq never
guesses (gate/up interleaving, for one, cannot be told from shapes).

Calibration: inside `all_experts(model)` every split-experts module runs every expert on all tokens
(so the hooks on each expert's linears see every token, as llm-compressor's calibration MoE blocks
do) while its output stays the routed one, and counts the tokens the router sent each expert
(`expert_token_counts`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .arch import UnsupportedArchError
from .experts import AllTokenExperts, ExpertLinear, ExpertMLP, SharedExperts, SplitExperts, SplitParallelExperts, _Split

try:
    from transformers.integrations.moe import _default_apply_gate, use_experts_implementation
except ImportError:  # pragma: no cover - transformers < 5 has no decorated experts
    _default_apply_gate = use_experts_implementation = None


SPLIT_TYPES = (SplitExperts, AllTokenExperts, SplitParallelExperts, SharedExperts)


# ---------------------------------------------------------------------------------------------
# Layouts


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy (works on the meta device: no data needed)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None, requires_grad: bool = False) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(_own(weight), requires_grad=requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(_own(bias), requires_grad=requires_grad)
    return lin


def _class_names(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


class _Reject(Exception):
    """A matched layout whose details smoothq cannot reproduce exactly (message: why)."""


_DISPATCH_CODE = None
if use_experts_implementation is not None:

    @use_experts_implementation
    class _Probe(nn.Module):
        def forward(self, hidden_states, top_k_index, top_k_weights):  # pragma: no cover - never run
            return hidden_states

    _DISPATCH_CODE = _Probe.forward.__code__

_MODULE_KEYS = set(nn.Module().__dict__)
# the decorator's layout description: true of the fused module, not of its split (not copied to it)
_LAYOUT_KEYS = {"has_gate", "has_bias", "has_post_expert_norm", "is_transposed", "is_concatenated"}


def _is_decorated(module: nn.Module) -> bool:
    """An instance of a `use_experts_implementation` class whose forward is still the decorator's
    dispatch (a subclass overriding forward, e.g. Ergo's per-route norm, computes something else)."""
    fwd = getattr(type(module).forward, "__code__", None)
    return _DISPATCH_CODE is not None and fwd is _DISPATCH_CODE and hasattr(module, "is_transposed")


def _split_decorated(m: nn.Module, norm_by_expert: bool = False) -> SplitExperts:
    t = bool(m.is_transposed)
    gated, biased = bool(m.has_gate), bool(m.has_bias)
    norm = bool(getattr(m, "has_post_expert_norm", False)) or norm_by_expert
    first = "gate_up_proj" if gated else "up_proj"
    expected = {first, "down_proj"} | ({f"{first}_bias", "down_proj_bias"} if biased else set())
    params = dict(m.named_parameters(recurse=False))
    if set(params) != expected:
        raise _Reject(f"parameters {sorted(params)}, expected {sorted(expected)}")
    extra = set(m._modules) - {"act_fn"} - ({"post_expert_norm"} if norm else set())
    if extra:
        raise _Reject(f"submodules {sorted(extra)} with no known role")
    w1, w2 = params[first], params["down_proj"]
    if w1.dim() != 3 or w2.dim() != 3:
        raise _Reject(f"{first} {tuple(w1.shape)} / down_proj {tuple(w2.shape)} are not 3-D")
    if t:  # [E, in, out] -> [E, out, in]
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    num_experts, hidden, inter = w2.shape
    rows = 2 * inter if gated else inter
    if tuple(w1.shape) != (num_experts, rows, hidden):
        raise _Reject(
            f"{first} {tuple(params[first].shape)} does not fit down_proj "
            f"{tuple(params['down_proj'].shape)} (is_transposed={t}, has_gate={gated})"
        )
    b1 = params[f"{first}_bias"] if biased else None
    b2 = params["down_proj_bias"] if biased else None
    if biased and (tuple(b1.shape) != (num_experts, rows) or tuple(b2.shape) != (num_experts, hidden)):
        raise _Reject(f"bias shapes {tuple(b1.shape)} / {tuple(b2.shape)}")

    concat = bool(getattr(m, "is_concatenated", True))
    if gated:  # rows (or bias entries) of expert e's gate and up, in the fused order
        gate_rows, up_rows = (slice(0, inter), slice(inter, rows)) if concat else (slice(0, None, 2), slice(1, None, 2))
    rg = params[first].requires_grad
    experts = []
    for e in range(num_experts):
        bias = (lambda b, r: b[e, r]) if biased else (lambda b, r: None)  # noqa: B023 - used within this iteration
        down = _linear(w2[e], bias(b2, slice(None)), rg)
        if gated:
            experts.append(
                ExpertMLP(
                    up=_linear(w1[e, up_rows], bias(b1, up_rows), rg),
                    down=down,
                    gate=_linear(w1[e, gate_rows], bias(b1, gate_rows), rg),
                )
            )
        else:
            experts.append(ExpertMLP(up=_linear(w1[e], bias(b1, slice(None)), rg), down=down))

    impl = getattr(type(m), "_apply_gate", None)
    if gated and impl is _default_apply_gate and concat:
        impl = None  # chunk(2) + act_fn(gate) * up: the same without re-assembling gate_up
    attrs = {
        k: v
        for k, v in m.__dict__.items()
        if not k.startswith("_")
        and k not in _MODULE_KEYS
        and k not in _LAYOUT_KEYS
        and not isinstance(v, (torch.Tensor, nn.Module))
    }
    split = SplitExperts(
        experts,
        act_fn=m._modules.get("act_fn"),
        gate_impl=impl if gated else None,
        interleaved=not concat,
        post_expert_norm=m._modules.get("post_expert_norm") if norm else None,
        norm_by_expert=norm_by_expert,
        attrs=attrs,
    )
    if gated and impl is not None:  # the class's gate must run on the split module's attributes alone
        try:
            probe = split._gate(torch.empty(1, inter, device="meta"), torch.empty(1, inter, device="meta"))
        except Exception as exc:  # noqa: BLE001 - any failure means the gate needs the fused module
            raise _Reject(f"its _apply_gate needs more than the module's plain attributes ({exc})") from None
        if tuple(probe.shape) != (1, inter):
            raise _Reject(f"its _apply_gate returns {tuple(probe.shape)} for gate_up (1, {rows})")
    elif not callable(getattr(m, "act_fn", None)):
        raise _Reject("no act_fn")
    return split


def _split_llama4(m: nn.Module) -> AllTokenExperts:
    gate_up, down = m.gate_up_proj, m.down_proj  # [E, H, 2I], [E, I, H]
    num_experts, hidden, two_i = gate_up.shape
    inter = two_i // 2
    if tuple(down.shape) != (num_experts, inter, hidden) or two_i != 2 * inter:
        raise _Reject(f"gate_up_proj {tuple(gate_up.shape)} does not fit down_proj {tuple(down.shape)}")
    rg = gate_up.requires_grad
    experts = [
        ExpertMLP(
            gate=_linear(gate_up[e, :, :inter].t(), requires_grad=rg),
            up=_linear(gate_up[e, :, inter:].t(), requires_grad=rg),
            down=_linear(down[e].t(), requires_grad=rg),
        )
        for e in range(num_experts)
    ]
    return AllTokenExperts(experts, m.act_fn)


def _split_dbrx(m: nn.Module) -> SplitExperts:
    mlp = m.mlp
    num_experts, ffn, hidden = m.num_experts, m.ffn_hidden_size, m.hidden_size
    shape = (num_experts, ffn, hidden)
    w1, v1, w2 = (p.view(shape) for p in (mlp.w1, mlp.v1, mlp.w2))
    rg = mlp.w1.requires_grad
    experts = [
        ExpertMLP(
            gate=_linear(w1[e], requires_grad=rg),
            up=_linear(v1[e], requires_grad=rg),
            down=_linear(w2[e].t(), requires_grad=rg),
        )
        for e in range(num_experts)
    ]
    return SplitExperts(experts, act_fn=mlp.activation_fn)


def _split_inkling_shared(m: nn.Module) -> SharedExperts:
    gate, up, down = m.gate_proj, m.up_proj, m.down_proj  # [S, I, H], [S, I, H], [S, H, I]
    if gate.shape != up.shape or down.shape != (gate.shape[0], gate.shape[2], gate.shape[1]):
        raise _Reject(f"shapes {tuple(gate.shape)}, {tuple(up.shape)}, {tuple(down.shape)}")
    rg = gate.requires_grad
    experts = [
        ExpertMLP(
            gate=_linear(gate[e], requires_grad=rg),
            up=_linear(up[e], requires_grad=rg),
            down=_linear(down[e], requires_grad=rg),
        )
        for e in range(gate.shape[0])
    ]
    return SharedExperts(experts, m.act_fn)


def _split_parallel(m: nn.Module) -> SplitParallelExperts:
    w = m.weight  # [E, out, in]
    return SplitParallelExperts([ExpertLinear(_linear(w[e], requires_grad=w.requires_grad)) for e in range(w.shape[0])])


@dataclass(frozen=True)
class Layout:
    name: str
    matches: Callable[[nn.Module], bool]
    split: Callable[[nn.Module], nn.Module]


LAYOUTS: tuple[Layout, ...] = (
    Layout("transformers", _is_decorated, _split_decorated),
    # Ergo: decorated projections, then one RMSNorm weight per expert on each route's output
    Layout(
        "ergo",
        lambda m: "ErgoExperts" in _class_names(m) and hasattr(m, "is_transposed"),
        lambda m: _split_decorated(m, norm_by_expert=True),
    ),
    Layout("inkling_shared", lambda m: "InklingSharedExperts" in _class_names(m), _split_inkling_shared),
    Layout("llama4", lambda m: "Llama4TextExperts" in _class_names(m), _split_llama4),
    Layout("dbrx", lambda m: "DbrxExperts" in _class_names(m), _split_dbrx),
    Layout(
        "parallel",
        lambda m: (
            bool({"JetMoeParallelExperts", "GraniteMoeParallelExperts"} & _class_names(m))
            and list(inspect.signature(m.forward).parameters)[:2] == ["inputs", "expert_size"]
        ),
        _split_parallel,
    ),
)

_COUNT_ATTRS = ("num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts", "num_routed_experts")
# names only MoE experts give 3-D parameters (w1/w2 are too generic: a dense model must never fail here)
_EXPERT_PARAM_NAMES = {"gate_up_proj", "up_proj", "down_proj", "gate_proj"}


def _looks_fused(module: nn.Module) -> bool:
    """Directly holds a 3-D parameter that is per expert: first dim = the module's expert count,
    a usual expert-projection name, or an experts class. torch's own layers (Conv1d, ...) are not."""
    if type(module).__module__.startswith("torch."):
        return False
    counts = {getattr(module, a) for a in _COUNT_ATTRS if isinstance(getattr(module, a, None), int)}
    expertish = "expert" in type(module).__name__.lower()
    return any(
        p.dim() == 3 and (p.shape[0] in counts or n in _EXPERT_PARAM_NAMES or expertish)
        for n, p in module.named_parameters(recurse=False)
    )


def _unsupported(path: str, module: nn.Module, why: str) -> UnsupportedArchError:
    shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in module.named_parameters(recurse=False) if p.dim() >= 2)
    return UnsupportedArchError(
        f"{path} ({type(module).__name__}{'; ' + shapes if shapes else ''}) cannot be split into per-expert "
        f"linears: {why}. Register an Arch with keep_float=({path!r},) to keep these experts in float, or open "
        "an issue naming the model type"
    )


def _split_one(path: str, module: nn.Module) -> nn.Module:
    for layout in LAYOUTS:
        if layout.matches(module):
            try:
                return layout.split(module)
            except Exception as why:  # noqa: BLE001 - _Reject, or a layout detail missing (AttributeError, ...)
                detail = str(why).splitlines()[0] if str(why) else type(why).__name__
                raise _unsupported(path, module, f"its layout is {layout.name!r}, but {detail}") from None
    raise _unsupported(path, module, "its 3-D expert parameters match no layout in smoothq.archs.moe.LAYOUTS")


def _replace(block: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, attr = path.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, attr, new)


def _is_fused(module: nn.Module) -> bool:
    return any(layout.matches(module) for layout in LAYOUTS) or _looks_fused(module)


# ---------------------------------------------------------------------------------------------
# Public API


def split_fused_experts(block: nn.Module, path: str | None = None, *, keep_float: Iterable[str] = ()) -> list[str]:
    """Replace fused experts modules under `block` by per-expert nn.Linear leaves; return their
    block-relative paths (those already split included: calling it twice is harmless).

    path=None: every fused experts module under `block` (found by LAYOUTS, or by holding 3-D
    per-expert parameters, which then must match a layout). path given: that module only; a block
    without it (a dense layer of a mixed dense/MoE stack) returns []. keep_float: block-relative
    patterns (fnmatch, e.g. an Arch's keep_float) of experts modules to leave fused, in float, and
    unchecked. Works on the meta device (no data is read). Unknown layouts raise
    UnsupportedArchError (one line: path, class, what to do).
    """
    keep = tuple(keep_float)
    if path is not None and any(fnmatch.fnmatchcase(path, k) for k in keep):
        return []
    if path is not None:
        try:
            module = block.get_submodule(path)
        except AttributeError:
            return []
        if isinstance(module, SPLIT_TYPES):
            return [path]
        if not _is_fused(module):
            raise _unsupported(path, module, "it holds no fused 3-D expert parameters")
        _replace(block, path, _split_one(path, module))
        return [path]

    found: list[tuple[str, nn.Module]] = []
    done: list[str] = []
    skip: list[str] = []  # prefixes whose subtree is not searched: split, to split, or kept in float
    for name, module in block.named_modules():
        if not name or any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, SPLIT_TYPES):
            done.append(name)
        elif any(fnmatch.fnmatchcase(name, k) for k in keep):
            pass
        elif _is_fused(module):
            found.append((name, module))
        else:
            continue
        skip.append(name)
    replaced = [(name, _split_one(name, module)) for name, module in found]  # all checked before any change
    for name, new in replaced:
        _replace(block, name, new)
    return sorted(done + [n for n, _ in found], key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])


def split_modules(module: nn.Module) -> Iterator[tuple[str, _Split]]:
    """(name under `module`, split experts module) for every split experts module under `module`."""
    for name, m in module.named_modules():
        if isinstance(m, SPLIT_TYPES):
            yield name, m


@contextlib.contextmanager
def all_experts(module: nn.Module):
    """Calibration mode: every SplitExperts under `module` runs every expert on all tokens (each
    expert linear's hooks see every token) and keeps only the routed (token, expert) contributions
    in its output, which is therefore the routed one. The tokens routed to each expert are counted
    from zero at the start of the context (`expert_token_counts`); the counts stay readable after."""
    mods = [m for _, m in split_modules(module)]
    before = [(m.run_all_experts, m.counting) for m in mods]
    for m in mods:
        m.run_all_experts = isinstance(m, SplitExperts)
        m.counting = True
        m.token_counts = [0] * m.num_experts
    try:
        yield module
    finally:
        for m, (run_all, counting) in zip(mods, before):
            m.run_all_experts, m.counting = run_all, counting


def expert_token_counts(module: nn.Module) -> dict[str, list[int]]:
    """{path under `module`: routed (token, expert) count per expert} since the last all_experts()
    began; zeros for a split module that never ran in one. Per module, the counts sum to tokens *
    top_k (SplitExperts: the router's top-k choices; AllTokenExperts: tokens with router score > 0;
    SplitParallelExperts: its expert_size)."""
    return {
        name: list(m.token_counts) if m.token_counts is not None else [0] * m.num_experts
        for name, m in split_modules(module)
    }
