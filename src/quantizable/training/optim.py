"""AdamW with the paper's parameter groups and the warm-up + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from quantizable.attention.gates import AttentionGate
from quantizable.models.families import is_norm
from quantizable.training.config import OptimConfig


def parameter_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """Decay everything except biases and norm weights (norm weights too with ``decay_layernorm_gamma``, B.3).

    Gate weights are decayed, as in the paper's code; with ``gate_lr_scale != 1`` they form their own groups at
    ``lr * gate_lr_scale``. Tied parameters are counted once; empty groups are left out.
    """
    gate_params = {id(p) for m in model.modules() if isinstance(m, AttentionGate) for p in m.parameters()
                   if config.gate_lr_scale != 1.0}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            exempt = name == "bias" or (is_norm(module) and not config.decay_layernorm_gamma)
            groups.setdefault((not exempt, id(param) in gate_params), []).append(param)
    return [
        {"params": params, "weight_decay": config.weight_decay if decayed else 0.0,
         "lr": config.lr * (config.gate_lr_scale if gate else 1.0)}
        for (decayed, gate), params in sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1]))
    ]


def make_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``parameter_groups``; with ``config.fused`` the fused implementation (one kernel over all
    parameters) wherever every parameter is a float tensor on CPU or CUDA. On CPU torch otherwise picks its
    per-parameter loop, which took 4x as long (bert-small: 15.0 vs 3.7 ms per optimizer step)."""
    groups = parameter_groups(model, config)
    fused = config.fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                 for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=fused or None)


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier of ``lr`` after ``step`` updates: linear warm-up from 0, then linear or cosine decay to
    ``final_lr_fraction`` at ``total_steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    shape = 1.0 - progress if config.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.final_lr_fraction + (1.0 - config.final_lr_fraction) * shape


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                   config: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
