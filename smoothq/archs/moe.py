"""Split fused MoE expert tensors into one nn.Linear per projection.

transformers >= 5 stores Mixtral-style experts as two 3D parameters, gate_up_proj [E, 2I, H]
(gate rows first, then up) and down_proj [E, H, I], with no per-expert modules. SmoothQuant needs
per-expert linears: to observe each expert's own inputs (down_proj sees only its tokens) and to
swap each one for a W8A8Linear. `SplitExperts` holds the same weights as nn.Linear leaves and
computes exactly what the fused module's eager path computes.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module):
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return lin


class SplitExperts(nn.ModuleList):
    """Drop-in for a fused experts module: forward(hidden_states, top_k_index, top_k_weights).
    A ModuleList, so experts are named `<path>.<e>.gate_proj` as in per-expert checkpoints."""

    def __init__(self, fused: nn.Module):
        num_experts, two_i, _ = fused.gate_up_proj.shape
        inter = two_i // 2
        super().__init__(
            ExpertMLP(fused.gate_up_proj[e, :inter], fused.gate_up_proj[e, inter:], fused.down_proj[e], fused.act_fn)
            for e in range(num_experts)
        )

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def split_fused_experts(block: nn.Module, path: str) -> None:
    """Replace block.<path> by SplitExperts if it still holds fused 3D expert tensors."""
    parent_name, _, attr = path.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    fused = getattr(parent, attr)
    if isinstance(fused, SplitExperts):
        return
    if getattr(getattr(fused, "gate_up_proj", None), "dim", lambda: 0)() != 3:
        raise ValueError(
            f"{path} is {type(fused).__name__}, not fused experts with a 3D gate_up_proj; "
            "this transformers version lays MoE experts out differently than smoothq expects"
        )
    if getattr(fused, "has_bias", False) or hasattr(fused, "gate_up_proj_bias"):
        raise ValueError(f"{path}: fused experts with biases are not supported yet")
    setattr(parent, attr, SplitExperts(fused))
