"""AdamW (or Muon for the hidden matrices) with the paper's parameter groups and the warm-up + decay schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from quantizable.attention.gates import AttentionGate
from quantizable.models.families import family_of_config, is_norm
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


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2D weights of the linear layers inside the transformer blocks (attention and MLP projections): what
    Muon trains. Embeddings, norms, biases, gates and no-op parameters (plain parameters, not linear layers), the
    embedding projection (outside the blocks) and the task head stay with AdamW, as in Outlier-Safe Pre-Training."""
    family = family_of_config(model.config)
    linears = [module for _, block in family.blocks(model) for module in block.modules()
               if family.linear_weight_axis(module) is not None]
    # under QAT the weight is a parametrization of the trained tensor
    weights = [m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight
               for m in linears]
    return [w for w in weights if w.ndim == 2 and w.requires_grad]


def orthogonalise(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration (Jordan et al., the coefficients of ``torch.optim.Muon``) in
    ``dtype``: maps a 2D update to about U V^T of its SVD (singular values pushed into roughly 0.5-1.5)."""
    a, b, c = coefficients
    x = update.to(dtype)
    wide = x.size(0) > x.size(1)
    if wide:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if wide else x).to(update.dtype)


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with the Newton-Schulz iteration in a chosen dtype. torch runs it in bfloat16, which
    is right on GPUs and wrong on most CPUs: without AVX512-BF16 / AMX a bf16 matmul is emulated, and on our AVX2
    machine the five iterations took 15-45x as long as in float32 (128x128: 18.3 vs 1.3 ms, 1024x256: 680 vs 20
    ms), which made a Muon step 14x an AdamW step. ``orthogonalise_dtype=None`` picks bfloat16 for parameters on
    an accelerator and float32 on CPU; with bfloat16 a step equals torch's exactly (tests/test_routes.py)."""

    def __init__(self, params, *, orthogonalise_dtype: torch.dtype | None = None, **kwargs) -> None:  # noqa: ANN001
        super().__init__(params, **kwargs)
        self.orthogonalise_dtype = orthogonalise_dtype

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                dtype = self.orthogonalise_dtype or (torch.float32 if param.device.type == "cpu" else torch.bfloat16)
                update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * _muon_lr_ratio(group["adjust_lr_fn"], param.shape))
        return loss


def _muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning-rate scaling per matrix shape (``adjust_lr_fn``)."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


class MuonAdamW(torch.optim.Optimizer):
    """Muon and AdamW stepped as one optimizer, so accelerate, the learning-rate schedule (which sets ``lr`` on the
    shared ``param_groups``) and checkpoints see a single object; ``state_dict`` holds both."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw
        super().__init__([p for g in [*muon.param_groups, *adamw.param_groups] for p in g["params"]], {})
        self.param_groups = [*muon.param_groups, *adamw.param_groups]

    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = self.muon.step(closure)
        self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


def make_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over ``parameter_groups``; with ``config.fused`` the fused implementation (one kernel over all
    parameters) wherever every parameter is a float tensor on CPU or CUDA. On CPU torch otherwise picks its
    per-parameter loop, which took 4x as long (bert-small: 15.0 vs 3.7 ms per optimizer step).

    ``config.name == "muon"``: ``Muon`` (torch's, orthogonalising in float32 on CPU) for ``hidden_matrices`` (their weight decay as configured) and
    AdamW for the rest of ``parameter_groups``. Muon runs with ``adjust_lr_fn="match_rms_adamw"`` (Moonlight's
    0.2 sqrt(max(A, B)) scaling), which matches its update RMS to AdamW's, so one ``lr`` and schedule serve both.
    """
    groups = parameter_groups(model, config)
    muon = None
    if config.name == "muon":
        hidden = {id(p) for p in hidden_matrices(model)}
        muon_params = [p for g in groups for p in g["params"] if id(p) in hidden]
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in hidden]} for g in groups]
        groups = [g for g in groups if g["params"]]
        muon = Muon(muon_params, lr=config.lr, weight_decay=config.weight_decay, adjust_lr_fn="match_rms_adamw")
    fused = config.fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                 for g in groups for p in g["params"])
    adamw = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=fused or None)
    return adamw if muon is None else MuonAdamW(muon, adamw)


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
