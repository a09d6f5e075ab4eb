"""N networks of one architecture fused into one stacked model (horizontal fusion, as in
HFTA, Wang et al., MLSys 2021): one forward and one backward train all N.

Every parameter and buffer of the N members is stacked along a leading member dimension,
and activations carry the members side by side in the channel dimension, ``(B, S*C, H, W)``:

- a convolution becomes one grouped convolution (member ``s`` owns groups ``s*g .. s*g+g-1``);
- BatchNorm over ``S*C`` channels normalises each member's channels with that member's own
  batch statistics and updates its own running statistics, exactly as N separate layers;
- a linear layer becomes one batched matrix product; ReLU and pooling act per channel.

So a model is stackable when its forward mixes channels only through those layers; its class
says so with ``stackable = True`` (the CIFAR ResNets, WRNs, VGGs, ResNet-18, MobileNetV2).
Channel concatenation or shuffling (DenseNet, ShuffleNet) would mix the members, so those
stay unfused. BatchNorm running statistics are why ``torch.func.vmap`` is not used: they
cannot be updated in place under vmap, while grouped layers keep them exact.

The member count ``S`` is read from the stacked weights at every call, so
``torch.func.functional_call`` may run more members than the module holds, e.g. the
students plus a hybrid of them (OKDPH), in the same single forward.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PREFIX = "body."
_STATELESS = (nn.ReLU, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)


class StackedConv2d(nn.Module):
    def __init__(self, convs: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        c = convs[0]
        if c.padding_mode != "zeros":
            raise ValueError("only zero-padded convolutions can be stacked")
        self.in_channels, self.groups = c.in_channels, c.groups
        self.stride, self.padding, self.dilation = c.stride, c.padding, c.dilation
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in convs]).clone())
        self.bias = (nn.Parameter(torch.stack([m.bias.detach() for m in convs]).clone())
                     if c.bias is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        s = self.weight.shape[0]
        w = self.weight.reshape(-1, *self.weight.shape[2:])
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            w = w.contiguous(memory_format=torch.channels_last)
        b = self.bias.reshape(-1) if self.bias is not None else None
        # A shared input (every member sees the same C channels) needs no copy per member: an
        # ungrouped convolution with the members' filters side by side computes the same thing.
        if x.shape[1] == self.in_channels and s > 1:
            if self.groups == 1:
                return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, 1)
            x = x.repeat(1, s, 1, 1)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, s * self.groups)


class StackedBatchNorm2d(nn.Module):
    # registered buffers, one row per member
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(self, bns: Sequence[nn.BatchNorm2d]) -> None:
        super().__init__()
        bn = bns[0]
        if bn.momentum is None or not bn.affine or not bn.track_running_stats:
            raise ValueError("only affine BatchNorm with running statistics and a momentum can be stacked")
        self.eps, self.momentum = bn.eps, bn.momentum
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in bns]).clone())
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in bns]).clone())
        self.register_buffer("running_mean", torch.stack([m.running_mean for m in bns]).clone())
        self.register_buffer("running_var", torch.stack([m.running_var for m in bns]).clone())
        self.register_buffer("num_batches_tracked", torch.stack([m.num_batches_tracked for m in bns]).clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        # Views of the stacked buffers: F.batch_norm's in-place update lands in each member's row.
        return F.batch_norm(x, self.running_mean.view(-1), self.running_var.view(-1), self.weight.reshape(-1),
                            self.bias.reshape(-1), self.training, self.momentum, self.eps)


class StackedLinear(nn.Module):
    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]).clone())
        self.bias = (nn.Parameter(torch.stack([m.bias.detach() for m in linears]).clone())
                     if linears[0].bias is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        s, out_f, in_f = self.weight.shape
        if x.shape[1] == in_f and s > 1:  # a shared input, as for a first layer
            x = x.repeat(1, s)
        out = torch.einsum("bsi,soi->bso", x.reshape(len(x), s, in_f), self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(len(x), s * out_f)


_STACKED = {nn.Conv2d: StackedConv2d, nn.BatchNorm2d: StackedBatchNorm2d, nn.Linear: StackedLinear}


def is_stackable(net: nn.Module) -> bool:
    return bool(getattr(type(net), "stackable", False))


class StackedNet(nn.Module):
    """The members of ``nets`` as one module: ``forward(x)`` gives logits ``(S, B, K)``.

    ``x`` is one shared batch ``(B, C, H, W)`` or the members' own views side by side,
    ``(B, S*C, H, W)`` (:func:`side_by_side`)."""

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        super().__init__()
        if not nets or not all(is_stackable(n) and type(n) is type(nets[0]) for n in nets):
            raise ValueError(f"{type(nets[0]).__name__} cannot be stacked")
        self.body = copy.deepcopy(nets[0])
        members = [dict(n.named_modules()) for n in nets]
        for name, module in list(self.body.named_modules()):
            kind = type(module)
            if kind in _STACKED:
                _replace(self.body, name, _STACKED[kind]([m[name] for m in members]))
            elif not isinstance(module, _STATELESS) and next(module.children(), None) is None \
                    and (any(True for _ in module.parameters(recurse=False))
                         or any(True for _ in module.buffers(recurse=False))):
                raise ValueError(f"layer {name} ({kind.__name__}) cannot be stacked")
        self.members = len(nets)

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        s = self._members_in_call()
        return out.reshape(len(out), s, -1).transpose(0, 1)

    def _members_in_call(self) -> int:
        # Under functional_call the weights may hold more members than the module was built with.
        for p in self.body.parameters():
            return p.shape[0]
        return self.members


def side_by_side(views: Sequence[Tensor], members: int) -> Tensor:
    """The input of a stacked forward: one shared view as it is, else member ``s`` gets view
    ``s`` (cycling) in its own channels."""
    if len(views) == 1:
        return views[0]
    return torch.cat([views[s % len(views)] for s in range(members)], dim=1)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def member_state_dict(stacked_state: dict[str, Tensor], member: int, prefix: str = PREFIX) -> dict[str, Tensor]:
    """The plain ``state_dict`` of one member, from a :class:`StackedNet`'s ``state_dict``
    (keys under ``prefix``): what a checkpoint of fused students gives to tools that load
    one network of the architecture."""
    return {k[len(prefix):]: v[member].clone() for k, v in stacked_state.items() if k.startswith(prefix)}
