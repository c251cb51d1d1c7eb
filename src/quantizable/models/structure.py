"""Architecture changes beyond attention, set in the model config so a saved model rebuilds them on load.

* ``single_scale_norm``: every LayerNorm / RMSNorm becomes a ``SingleScaleNorm`` with one scalar gain instead of
  one per channel (Outlier-Safe Pre-Training, Park et al. 2025): a per-channel gain is a direct way for training to
  blow up a few channels, a scalar cannot single any channel out. A LayerNorm's per-channel bias is kept (it adds,
  it does not amplify). In post-LN BERT the norms sit after each residual sum (and on the embeddings and in the MLM
  head): all of them get a scalar gain.
* ``embedding_projection``: a learnable ``d x d`` matrix applied to the input embeddings' output (OSP's EmbProj),
  held by the embedding module and applied by a forward hook, so tied output embeddings stay tied. It starts at the
  identity: the model starts out computing what it would without it.

* ``registers``: ``N`` learned tokens appended to a ViT's input sequence after [CLS] and the patches, without a
  position embedding, and dropped from the base model's output, so the pooled [CLS] token and the head never see
  them (Darcet et al., "Vision Transformers Need Registers", ICLR 2024): they give attention a place to park the
  high-norm tokens a ViT otherwise builds on background patches. ``register_tokens`` (``(1, N, d)``) sits on the
  family's ``sequence_embeddings`` module, beside [CLS] and the position embeddings, so weight transforms that
  handle those (rotation) handle it too. Hidden states read inside the model keep them as the last ``N`` positions.

The first two replace modules through ``is_norm`` and ``get_input_embeddings`` (no per-family code), registers go
where the family record says.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedConfig
from transformers import initialization as init

from quantizable.models.families import family_of_config, is_norm

REGISTER_INIT_STD = 1e-6  # DINOv2's and timm's initialisation of register tokens


class SingleScaleNorm(nn.Module):
    """A LayerNorm (mean and variance, optional bias) or RMSNorm with one learned scalar gain ``weight`` (shape 1)."""

    def __init__(self, shape: tuple[int, ...], eps: float, rms: bool, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.shape, self.eps, self.rms = shape, eps, rms
        self.weight = nn.Parameter(torch.ones(1))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def replacing(cls, norm: nn.Module) -> "SingleScaleNorm":
        """The single-scale form of a family norm: its shape, epsilon and kind (RMS unless it subtracts the mean)."""
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
        rms = not type(norm).__name__.endswith("LayerNorm")
        shape = tuple(norm.weight.shape)
        return cls(shape, float(eps), rms, getattr(norm, "bias", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            x32 = x.float()
            normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        else:
            normed = F.layer_norm(x, self.shape, None, None, self.eps)
        out = normed * self.weight.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.shape}, eps={self.eps}, {'rms' if self.rms else 'layer'}, bias={self.bias is not None}"


def _project_embeddings(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.embedding_projection(output)


def _append_registers(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    registers = module.register_tokens.to(output.dtype).expand(output.shape[0], -1, -1)
    return torch.cat((output, registers), dim=1)


def _drop_registers(module: nn.Module, args: tuple, output):
    """The base model's output without the trailing registers (a ``ModelOutput``, or a tuple with
    ``return_dict=False``); the pooler, if any, read [CLS] at position 0."""
    count = module.config.registers
    if isinstance(output, tuple):
        return (output[0][:, :-count], *output[1:])
    output.last_hidden_state = output.last_hidden_state[:, :-count]
    return output


def _install_registers(model: nn.Module, config: PreTrainedConfig) -> None:
    count, family = config.registers, family_of_config(config)
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"model.registers must be an integer >= 0, got {count!r}")
    if family.sequence_embeddings is None:
        raise ValueError(f"model.registers={count}: registers are tokens appended to a ViT's image patches; the "
                         f"{family.display_name} family has none (only vit supports them)")
    embeddings = family.submodule(model, family.sequence_embeddings)
    embeddings.register_tokens = nn.Parameter(torch.empty(1, count, config.hidden_size))
    reset_structure(embeddings)
    embeddings.register_forward_hook(_append_registers)
    model.base_model.register_forward_hook(_drop_registers)


def install_structure(model: nn.Module, config: PreTrainedConfig) -> None:
    """Apply the config's ``single_scale_norm``, ``embedding_projection`` and ``registers`` to a freshly built
    model."""
    if getattr(config, "single_scale_norm", False):
        for name, module in list(model.named_modules()):
            if is_norm(module) and not isinstance(module, SingleScaleNorm):
                model.set_submodule(name, SingleScaleNorm.replacing(module))
    if getattr(config, "embedding_projection", False):
        embeddings = model.get_input_embeddings()
        dim = embeddings.weight.shape[1] if isinstance(embeddings, nn.Embedding) else config.hidden_size
        projection = nn.Linear(dim, dim, bias=False)
        projection.is_embedding_projection = True
        embeddings.embedding_projection = projection
        reset_structure(projection)
        embeddings.register_forward_hook(_project_embeddings)
    if getattr(config, "registers", 0):
        _install_registers(model, config)


def reset_structure(module: nn.Module) -> None:
    """Initialise what this file adds (gain 1, identity projection, registers near zero); transformers' init
    functions skip tensors loaded from a checkpoint."""
    if isinstance(module, SingleScaleNorm):
        init.ones_(module.weight)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Linear) and getattr(module, "is_embedding_projection", False):
        init.eye_(module.weight)
    elif isinstance(getattr(module, "register_tokens", None), nn.Parameter):
        init.normal_(module.register_tokens, std=REGISTER_INIT_STD)
