"""The modules fused experts are split into (archs/moe.py does the splitting): one nn.Linear per
expert projection, named as per-expert checkpoints name them (`<e>.gate_proj`, `.up_proj`,
`.down_proj`), each computing what the fused module's eager forward computes. Inside
moe.all_experts() they run every expert on every token (calibration) while returning the routed
output, and count the tokens the router sent each expert."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn


class ExpertMLP(nn.Module):
    """One expert: gate_proj (absent in ungated experts), up_proj, down_proj. Its gate, activation
    and post-expert norm belong to the owning SplitExperts (shared by all experts, as in the fused
    module); calling an ExpertMLP runs the expert through them."""

    def __init__(self, up: nn.Linear, down: nn.Linear, gate: nn.Linear | None = None):
        super().__init__()
        self.index = 0  # set by the owner
        if gate is not None:
            self.gate_proj = gate
        self.up_proj = up
        self.down_proj = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.__dict__["_owner"].expert_forward(self, x)


class ExpertLinear(nn.Module):
    """One expert of a single-projection experts module (JetMoe's ParallelExperts): `<e>.proj`."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _Split(nn.Module):
    """Shared by the split modules: experts as children "0".."E-1", the all-experts flag, counts."""

    def _init_experts(self, experts: list[nn.Module]) -> None:
        self.num_experts = len(experts)
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
            if isinstance(expert, ExpertMLP):
                expert.index = e
                expert.__dict__["_owner"] = self  # not a submodule: no cycle in named_modules
        self.run_all_experts = False
        self.counting = False  # True inside all_experts()
        self.token_counts: list[int] | None = None  # set to zeros when an all_experts() begins

    def __getitem__(self, e: int) -> nn.Module:
        if not -self.num_experts <= e < self.num_experts:
            raise IndexError(e)
        return self._modules[str(e % self.num_experts)]

    def __len__(self) -> int:
        return self.num_experts

    def __iter__(self) -> Iterator[nn.Module]:
        return (self._modules[str(e)] for e in range(self.num_experts))

    def _count(self, counts) -> None:
        if self.counting and self.token_counts is not None:
            self.token_counts = [a + int(b) for a, b in zip(self.token_counts, counts)]


class SplitExperts(_Split):
    """Drop-in for a routed experts module: forward(hidden_states, top_k_index, top_k_weights)
    (gpt-oss's names router_indices= / routing_weights= accepted too). Experts are children
    `<e>.gate_proj/.up_proj/.down_proj`; `act_fn` and `post_expert_norm` keep the fused module's
    names (and checkpoint keys). Tokens routed to an index >= E (expert-parallel sentinels) get
    no contribution from it. Half-precision outputs are summed over the top-k in float32, as
    transformers' batched/grouped backends do (its eager loop sums in the model dtype: with more
    than two experts per token the last bit may differ); float32/float64 sum in their own dtype.
    """

    def __init__(
        self,
        experts: list[ExpertMLP],
        *,
        act_fn: nn.Module | None = None,
        gate_impl: Callable | None = None,
        interleaved: bool = False,
        post_expert_norm: nn.Module | None = None,
        norm_by_expert: bool = False,
        attrs: dict | None = None,
    ):
        super().__init__()
        for k, v in (attrs or {}).items():  # what the fused class's _apply_gate reads (limit, alpha, ...)
            setattr(self, k, v)
        if act_fn is not None:
            self.act_fn = act_fn
        if post_expert_norm is not None:
            self.post_expert_norm = post_expert_norm
        self._init_experts(experts)
        self._gate_impl = gate_impl  # None: act_fn(gate) * up
        self._interleaved = interleaved
        self._norm_by_expert = norm_by_expert  # post_expert_norm(y, expert_ids): one norm weight per expert

    def _gate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self._gate_impl is None:
            return self.act_fn(gate) * up
        if self._interleaved:  # the fused order: gate0, up0, gate1, up1, ...
            gate_up = torch.stack((gate, up), dim=-1).flatten(-2)
        else:
            gate_up = torch.cat((gate, up), dim=-1)
        return self._gate_impl(self, gate_up)

    def expert_forward(self, expert: ExpertMLP, x: torch.Tensor) -> torch.Tensor:
        up = expert.up_proj(x)
        gate_proj = getattr(expert, "gate_proj", None)
        h = self._gate(gate_proj(x), up) if gate_proj is not None else self.act_fn(up)
        y = expert.down_proj(h)
        post = self._modules.get("post_expert_norm")
        if post is None:
            return y
        if self._norm_by_expert:
            return post(y, torch.full(y.shape[:1], expert.index, dtype=torch.long, device=y.device))
        return post(y)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
        *,
        router_indices: torch.Tensor | None = None,
        routing_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        top_k_index = top_k_index if top_k_index is not None else router_indices
        top_k_weights = top_k_weights if top_k_weights is not None else routing_weights
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        num_tokens = x.shape[0]
        index = top_k_index.reshape(num_tokens, -1)
        weights = top_k_weights.reshape(num_tokens, -1)
        top_k, num_experts = index.shape[1], self.num_experts

        # one host sync: the (token, slot) pairs of each expert, in token order
        flat = index.reshape(-1)
        valid = (flat >= 0) & (flat < num_experts)
        order = torch.argsort(torch.where(valid, flat, num_experts), stable=True)
        counts = torch.bincount(flat[valid], minlength=num_experts).tolist()
        self._count(counts)

        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        out = torch.zeros(x.shape, dtype=acc, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            pairs = order[start : start + n]
            start += n
            if self.run_all_experts:  # every token through the expert; only the routed rows are kept
                y = self.expert_forward(self[e], x)
                if n == 0:
                    continue
                token_idx = pairs // top_k
                y = y[token_idx]
            else:
                if n == 0:
                    continue
                token_idx = pairs // top_k
                y = self.expert_forward(self[e], x[token_idx])
            y = y * weights[token_idx, pairs % top_k, None]
            out.index_add_(0, token_idx, y.to(acc))
        return out.to(hidden_states.dtype).view(shape)


class AllTokenExperts(_Split):
    """Drop-in for Llama4TextExperts: forward(hidden_states) with hidden_states [E * T, H], expert
    e's rows e*T:(e+1)*T already scaled by the router (0 for the tokens not routed to e). Every
    expert always sees every token, so all_experts() changes nothing here; the count of expert e is
    its number of nonzero input rows: the tokens with router score > 0 (a routed token whose hidden
    state is exactly zero is not counted)."""

    def __init__(self, experts: list[ExpertMLP], act_fn: nn.Module):
        super().__init__()
        self.act_fn = act_fn
        self._init_experts(experts)

    def expert_forward(self, expert: ExpertMLP, x: torch.Tensor) -> torch.Tensor:
        return expert.down_proj(expert.up_proj(x) * self.act_fn(expert.gate_proj(x)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = hidden_states.shape[-1]
        x = hidden_states.view(self.num_experts, -1, hidden)
        if self.counting:
            self._count((x != 0).any(dim=-1).sum(dim=-1).tolist())
        return torch.stack([self.expert_forward(self[e], x[e]) for e in range(self.num_experts)]).view(-1, hidden)


class SplitParallelExperts(_Split):
    """Drop-in for JetMoe's ParallelExperts: forward(inputs, expert_size), inputs sorted by expert.
    One projection per expert (`<e>.proj`): the gate/up/act/down of the MoE live in the parent,
    so all_experts() cannot run an expert's whole MLP here and leaves these routed; the counts are
    expert_size (the rows the router sent each expert)."""

    def __init__(self, experts: list[ExpertLinear]):
        super().__init__()
        self._init_experts(experts)

    def forward(self, inputs: torch.Tensor, expert_size) -> torch.Tensor:
        sizes = [int(s) for s in expert_size]
        self._count(sizes)
        outs = []
        for expert, chunk in zip(self, inputs.split(sizes, dim=0)):
            proj = expert.proj
            if chunk.shape[0] == 0:  # no hook call on zero rows
                outs.append(chunk.new_empty(0, proj.out_features))
            else:
                outs.append(expert(chunk))
        return torch.cat(outs, dim=0)


class SharedExperts(_Split):
    """Drop-in for Inkling's shared experts (3-D gate_proj/up_proj/down_proj, one per shared expert):
    forward(hidden_states, gammas), every token through every shared expert, its down_proj input
    scaled by the token's gamma for that expert; the outputs summed. Counts: every token, per expert."""

    def __init__(self, experts: list[ExpertMLP], act_fn: nn.Module):
        super().__init__()
        self.act_fn = act_fn
        self._init_experts(experts)

    def forward(self, hidden_states: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        gammas = gammas.reshape(x.shape[0], self.num_experts)
        self._count([x.shape[0]] * self.num_experts)
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        out = torch.zeros(x.shape, dtype=acc, device=x.device)
        for e, expert in enumerate(self):
            h = self.act_fn(expert.gate_proj(x)) * expert.up_proj(x) * gammas[:, e, None]
            out += expert.down_proj(h).to(acc)
        return out.to(hidden_states.dtype).view(shape)
