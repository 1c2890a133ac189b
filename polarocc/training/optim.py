"""Adam through torch's functional kernel (``torch.optim.adam.adam``).

Same arithmetic as ``torch.optim.Adam`` (L2 weight decay added to the gradient), but constructing
``torch.optim.Adam`` imports torch._dynamo on first use, which costs seconds in every short-lived stage
process; the functional kernel does not.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam


class Adam:
    """Minimal Adam over a list of parameters whose ``.grad`` the caller fills."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        self.params = [p for p in params if p is not None]
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [torch.tensor(0.0, dtype=torch.float32) for _ in self.params]

    def zero_grad(self) -> None:
        """Drop the gradients."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update from the parameters' ``.grad``."""
        with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        adam([self.params[i] for i in with_grad], [self.params[i].grad for i in with_grad],
             [self.exp_avg[i] for i in with_grad], [self.exp_avg_sq[i] for i in with_grad], [],
             [self.steps[i] for i in with_grad], foreach=False, capturable=False, differentiable=False,
             fused=None, grad_scale=None, found_inf=None, has_complex=False, amsgrad=False,
             beta1=self.betas[0], beta2=self.betas[1], lr=self.lr, weight_decay=self.weight_decay,
             eps=self.eps, maximize=False)

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        """The moment estimates and step counts (for resuming an online run)."""
        return {"exp_avg": [t.detach().cpu().clone() for t in self.exp_avg],
                "exp_avg_sq": [t.detach().cpu().clone() for t in self.exp_avg_sq],
                "steps": [t.clone() for t in self.steps]}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        """Restore what :meth:`state_dict` returned, onto the parameters' devices."""
        if len(state["exp_avg"]) != len(self.params):
            raise ValueError(f"optimizer state holds {len(state['exp_avg'])} parameters, expected {len(self.params)}")
        for i, p in enumerate(self.params):
            self.exp_avg[i] = state["exp_avg"][i].to(p)
            self.exp_avg_sq[i] = state["exp_avg_sq"][i].to(p)
            self.steps[i] = state["steps"][i].clone()
