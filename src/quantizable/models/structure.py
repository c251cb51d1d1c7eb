"""Architecture changes beyond attention, set in the model config so a saved model rebuilds them on load.

* ``single_scale_norm``: every LayerNorm / RMSNorm becomes a ``SingleScaleNorm`` with one scalar gain instead of
  one per channel (Outlier-Safe Pre-Training, Park et al. 2025): a per-channel gain is a direct way for training to
  blow up a few channels, a scalar cannot single any channel out. A LayerNorm's per-channel bias is kept (it adds,
  it does not amplify). In post-LN BERT the norms sit after each residual sum (and on the embeddings and in the MLM
  head): all of them get a scalar gain.
* ``embedding_projection``: a learnable ``d x d`` matrix applied to the input embeddings' output (OSP's EmbProj),
  held by the embedding module and applied by a forward hook, so tied output embeddings stay tied. It starts at the
  identity: the model starts out computing what it would without it.

Both replace modules through ``is_norm`` and ``get_input_embeddings`` (no per-family code).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedConfig
from transformers import initialization as init

from quantizable.models.families import is_norm


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


def install_structure(model: nn.Module, config: PreTrainedConfig) -> None:
    """Apply the config's ``single_scale_norm`` and ``embedding_projection`` to a freshly built model."""
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


def reset_structure(module: nn.Module) -> None:
    """Initialise a module this file adds (gain 1, identity projection); transformers' init functions skip
    tensors loaded from a checkpoint."""
    if isinstance(module, SingleScaleNorm):
        init.ones_(module.weight)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Linear) and getattr(module, "is_embedding_projection", False):
        init.eye_(module.weight)
