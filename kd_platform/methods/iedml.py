"""``iedml``: inheritance and exploration applied to deep mutual learning (IE-DML).

The IE-KD paper (Huang et al., CVPR 2021) also trains two networks mutually with its
inheritance/exploration split, but the authors never released that IE-DML code; what
follows is the platform's reading of the paper, not a reproduction of theirs.

Two networks A and B of one architecture learn with the DML loss (T=1 by default). Each
also trains online an auto-encoder on its own last-stage feature map (detached, so the
reconstruction loss shapes only the auto-encoder): encoder and decoder of three 3x3
conv + BN + LeakyReLU(0.1) layers, ``k = rate * C`` code channels, mean L1 reconstruction.
The target factor of A is B's code (flattened, L2-normalised, detached) and vice versa.
Each network's feature map is split by channels into an inheritance part (fraction
``split``) and an exploration part, each with its own encoder to ``k`` channels::

    L_A = CE_A + KD(z_A || z_B) + l_inh D(f_I^A, f_T^B) - l_exp D(f_E^A, f_T^B)
    L   = L_A + L_B + recon_A + recon_B

with ``D`` the mean ``|x - y|^p`` (p=1 by default; knob ``distance``). Every network takes
one forward per batch (features, then the classifier on them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_platform.config.knobs import knob
from kd_platform.losses import mean_kd_to_peers, total
from kd_platform.methods._online import detached_mean, peer_eval_networks
from kd_platform.methods.base import Batch, BuildEnv, Method, MethodKind, StepContext, peer_names
from kd_platform.methods.ie_parts import (
    FactorAutoEncoder,
    IEKnobs,
    InheritExploreSplit,
    factor_channels,
    factor_distance,
    to_factor,
)
from kd_platform.methods.registry import register_method

N_NETWORKS = 2


@dataclass(frozen=True)
class IEDMLConfig(IEKnobs):
    temperature: float = knob(1.0, low=0.1, high=20.0, help="T of the mutual KD terms")


@register_method
class IEDML(Method):
    name = "iedml"
    Config = IEDMLConfig
    cfg: IEDMLConfig
    kind = MethodKind.ONLINE

    @classmethod
    def student_names(cls, cfg: IEDMLConfig) -> tuple[str, ...]:
        return peer_names(N_NETWORKS)

    def __init__(self, cfg: IEDMLConfig, env: BuildEnv) -> None:
        super().__init__(cfg, env)
        nets = [env.make_model(env.recipe.arch) for _ in range(N_NETWORKS)]
        self.nets = nn.ModuleList(nets)
        channels = nets[0].feature_channels
        k = factor_channels(channels, cfg.rate)
        self.autoencoders = nn.ModuleList(FactorAutoEncoder(channels, k) for _ in range(N_NETWORKS))
        self.splits = nn.ModuleList(InheritExploreSplit(channels, k, cfg.split, cfg.split_mode)
                                    for _ in range(N_NETWORKS))

    def ie_terms(self, fmaps: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per network: inheritance distance, exploration distance, auto-encoder reconstruction loss."""
        coded = [ae(f.detach()) for ae, f in zip(self.autoencoders, fmaps)]
        targets = [to_factor(code).detach() for code, _ in coded]
        inh, exp = [], []
        for i, (split, f) in enumerate(zip(self.splits, fmaps)):
            f_inh, f_exp = split(f)
            target = targets[(i + 1) % N_NETWORKS]
            inh.append(factor_distance(f_inh, target, self.cfg.distance))
            exp.append(factor_distance(f_exp, target, self.cfg.distance))
        return inh, exp, [recon for _, recon in coded]

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        cfg = self.cfg
        fmaps = [net.features(batch.x) for net in self.nets]
        logits = [net.classify(f) for net, f in zip(self.nets, fmaps)]
        ce = [F.cross_entropy(z, batch.y) for z in logits]
        kd = [mean_kd_to_peers(logits, i, cfg.temperature) for i in range(N_NETWORKS)]
        inh, exp, recon = self.ie_terms(fmaps)
        loss = total(c + k + cfg.l_inh * a - cfg.l_exp * b for c, k, a, b in zip(ce, kd, inh, exp)) + total(recon)
        return {"loss": loss, "ce": detached_mean(ce), "kd": detached_mean(kd), "inherit": detached_mean(inh),
                "explore": detached_mean(exp), "reconstruction": detached_mean(recon)}

    def peer_parameters(self) -> dict[str, Tensor] | None:
        named = [dict(net.named_parameters()) for net in self.nets]
        return {k: torch.stack([p[k] for p in named]) for k in named[0]}

    def eval_networks(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return peer_eval_networks(self.students, lambda x: [net(x) for net in self.nets])
