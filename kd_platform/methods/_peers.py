"""Homogeneous peers (OKDPH's students, DML's and KDCL's networks): N networks of one
architecture, run one after another or fused into one stacked model (``kd_platform.models.stacked``).

Methods see the same interface either way (logits per peer, stacked parameters, the
in-place pull towards the mean), so their loss code is written once and the two forms
compute the same numbers: the fused form only changes how many kernels run.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from kd_platform.models.stacked import PREFIX, StackedNet, member_state_dict, side_by_side

State = dict[str, Tensor]


class Peers(nn.Module):
    """``n`` networks from ``make()``; with ``same_init`` all start from the first one's weights.

    Unfused, the networks are ``nets[i]``; fused, one :class:`StackedNet` ``stack``. Either
    way ``forward(views, extra)`` returns each peer's logits on its view (view ``i``, cycling)
    and then each extra member's: a network of the same architecture given only by its
    parameters and buffers (OKDPH's hybrid), run in the same stacked forward when fused.
    """

    def __init__(self, make: Callable[[], nn.Module], n: int, fused: bool, same_init: bool = False) -> None:
        super().__init__()
        nets = [make() for _ in range(n)]
        if same_init:
            for net in nets[1:]:
                net.load_state_dict(nets[0].state_dict())
        self.n, self.fused = n, fused
        self._make = make
        if fused:
            self.stack = StackedNet(nets)
        else:
            self.nets = nn.ModuleList(nets)

    # ---------------------------------------------------------------- forwards

    def forward(self, views: Sequence[Tensor], extra: Sequence[State] = ()) -> list[Tensor]:
        if self.fused:
            return self._stacked_forward(views, extra)
        logits = [net(views[i % len(views)]) for i, net in enumerate(self.nets)]
        for j, state in enumerate(extra):
            logits.append(functional_call(self.nets[0], state, (views[(self.n + j) % len(views)],)))
        return logits

    def _stacked_forward(self, views: Sequence[Tensor], extra: Sequence[State]) -> list[Tensor]:
        members = self.n + len(extra)
        x = side_by_side(views, members)
        if not extra:
            return list(self.stack(x).unbind(0))
        own = self._own_state()
        state = {k: torch.cat([v, *(e[_plain(k)].unsqueeze(0) for e in extra)]) for k, v in own.items()}
        out = functional_call(self.stack, state, (x,))
        if self.training:  # the peers' rows of the running statistics were updated in the copy
            with torch.no_grad():
                for k, b in self.stack.named_buffers():
                    if b.is_floating_point():
                        b.copy_(state[k][:self.n])
        return list(out.unbind(0))

    def _own_state(self) -> State:
        """Parameters and float buffers of the stack (integer counters stay the module's own)."""
        return {**dict(self.stack.named_parameters()),
                **{k: b for k, b in self.stack.named_buffers() if b.is_floating_point()}}

    # ---------------------------------------------------------------- the peers' weights

    def stacked(self, buffers: bool = False) -> State:
        """Every parameter (or float buffer) of the peers stacked along a leading peer
        dimension, under the plain network's names; still functions of the live tensors."""
        if self.fused:
            own = self.stack.named_buffers() if buffers else self.stack.named_parameters()
            return {_plain(k): v for k, v in own if v.is_floating_point()}
        named = [dict(n.named_buffers() if buffers else n.named_parameters()) for n in self.nets]
        return {k: torch.stack([p[k] for p in named]) for k, v in named[0].items() if v.is_floating_point()}

    def mixed_state(self, r: Tensor, keep_grad: bool) -> State:
        """Parameters and buffers of the convex combination ``sum_i r_i peer_i``.

        With ``keep_grad`` the parameters stay functions of the live peer tensors, so a loss on
        the mixture sends ``r_i`` times its gradient to peer ``i``. Float buffers (BatchNorm
        statistics) are mixed the same way; integer buffers come from the first peer. The
        mixture keeps the peers' dtype under autocast too."""
        out: State = {}
        params = self.stacked()
        first = next(iter(params.values()))
        r = r.to(first)  # one host-to-device copy per step, not one per tensor
        # Mixed in the peers' own precision even under bf16 autocast (which would round every
        # mixed weight and running statistic to bf16): the hybrid then holds fp32 weights like
        # the students, and autocast casts them per matmul, for it as for them.
        with torch.autocast(first.device.type, enabled=False):
            for key, stack in params.items():
                out[key] = torch.tensordot(r, stack if keep_grad else stack.detach(), dims=1)
            with torch.no_grad():
                for key, stack in self.stacked(buffers=True).items():
                    out[key] = torch.tensordot(r.to(stack.dtype), stack, dims=1)
                for key, b in self.first_int_buffers().items():
                    out[key] = b.clone()
        return out

    def first_int_buffers(self) -> State:
        if self.fused:
            return {_plain(k): b[0] for k, b in self.stack.named_buffers() if not b.is_floating_point()}
        return {k: b for k, b in self.nets[0].named_buffers() if not b.is_floating_point()}

    @torch.no_grad()
    def pull_to_mean_(self, g: float) -> None:
        """Move every peer (parameters and float buffers) ``g`` of the way to the peers' mean;
        optimiser state is left alone."""
        if self.fused:
            for t in [*self.stack.parameters(), *(b for b in self.stack.buffers() if b.is_floating_point())]:
                mean = t.mean(0, keepdim=True)
                t.mul_(1 - g).add_(mean, alpha=g)
            return
        tensors = [list(net.parameters()) + [b for b in net.buffers() if b.is_floating_point()]
                   for net in self.nets]
        for group in zip(*tensors):
            mean = torch.stack(group).mean(0)
            for t in group:
                t.mul_(1 - g).add_(mean, alpha=g)

    def member_state_dict(self, i: int) -> State:
        """Peer ``i`` as the plain network's ``state_dict``, whichever form trains it."""
        if self.fused:
            return member_state_dict(self.stack.state_dict(), i)
        return {k: v.clone() for k, v in self.nets[i].state_dict().items()}

    def member(self, i: int) -> nn.Module:
        """Peer ``i`` as a plain network: unfused, the live network itself; fused, a fresh copy
        holding the member's current weights (on the stack's device)."""
        if not self.fused:
            return self.nets[i]
        device = next(self.stack.parameters()).device
        net = self._make().to(device)
        net.load_state_dict(self.member_state_dict(i))
        return net

    def mean_member(self) -> nn.Module:
        """A plain network holding the peers' mean (parameters and float buffers), the mixture
        ``mixed_state`` builds for equal weights."""
        net = copy.deepcopy(self.member(0)) if not self.fused else self.member(0)
        state = self.mixed_state(torch.full((self.n,), 1.0 / self.n), keep_grad=False)
        with torch.no_grad():
            net.load_state_dict({k: v.detach().clone() for k, v in state.items()})
        return net


def _plain(stacked_key: str) -> str:
    return stacked_key[len(PREFIX):] if stacked_key.startswith(PREFIX) else stacked_key
