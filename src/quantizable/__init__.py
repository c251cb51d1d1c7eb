"""quantizable: train transformers that quantize to full INT8 (clipped softmax and gated attention).

The public names are imported on first use, so that the ``quantizable`` command answers ``--help`` without
waiting for torch and transformers. ``import quantizable`` registers our model classes with transformers' ``Auto*``
classes and our image processor with ``AutoImageProcessor`` as soon as transformers is imported (at once if it
already is), so ``AutoModel*`` and transformers' pipelines load saved runs without ``trust_remote_code``.
"""

import importlib
import importlib.abc
import importlib.util
import inspect
import logging
import sys
from typing import Any

# transformers imports torchao, whose CPU wheel logs about GPU-only kernels and deprecated enum registrations.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

__version__ = "0.1.0"
_PUBLIC = {"AttentionSpec": "quantizable.attention", "clipped_softmax": "quantizable.attention",
           "apply_attention_spec": "quantizable.models", "create_model": "quantizable.models",
           "load_model": "quantizable.models"}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'quantizable' has no attribute {name!r}")
    _register()
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def _register() -> None:
    import quantizable.models  # noqa: F401  (importing the models registers them)
    from quantizable.data.images import register_image_processor

    register_image_processor()


def _inside_our_import() -> bool:
    """Whether one of our modules is being imported further up the stack: registering then would import
    ``quantizable.models`` in the middle of its own dependencies."""
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "<module>" and str(frame.f_globals.get("__name__", "")).startswith("quantizable."):
            return True
        frame = frame.f_back
    return False


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Runs ``_register`` right after ``import transformers`` finishes, wherever that import happens, so that
    importing quantizable costs nothing until transformers is loaded anyway."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_then_register(module: Any) -> None:
                execute(module)
                if not _inside_our_import():  # our own modules register where they need it (quantizable.models)
                    _register()

            spec.loader.exec_module = exec_then_register  # this spec's loader only
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterWithTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
