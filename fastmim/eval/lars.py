"""LARS (layer-wise adaptive rate scaling), as MAE's linear probe uses it: SGD with momentum whose update of every
parameter with more than one dimension is first rescaled by ``trust * ||p|| / ||g + wd p||`` (1 when either norm is
zero); biases and norms (one dimension) step with the plain gradient."""

from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """Args: lr; weight_decay (MAE's probe: 0); momentum (0.9); trust_coefficient (0.001)."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):  # fmt: skip
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"LARS: bad hyperparameters lr={lr}, weight_decay={weight_decay}, momentum={momentum}, "
                             f"trust_coefficient={trust_coefficient}")  # fmt: skip
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))  # fmt: skip

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:  # the layer-wise trust ratio
                    update = update.add(p, alpha=g["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), g["trust_coefficient"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))  # fmt: skip
                    update = update * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(g["momentum"]).add_(update)
                p.add_(buf, alpha=-g["lr"])
        return loss
