"""What a model is trained on: one ``Task`` value instead of "mlm" / "clm" / "image" strings.

``Task`` is a ``StrEnum``, so configs, results files and older callers that hold the plain strings compare equal.
"""

from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    MLM = "mlm"  # masked language modelling (text)
    CLM = "clm"  # causal language modelling (text)
    IMAGE = "image"  # image classification

    @property
    def metric(self) -> str:
        return "accuracy" if self is Task.IMAGE else "perplexity"

    @property
    def auto_class(self) -> type:
        """The ``AutoModelFor*`` class of the task's head."""
        from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForMaskedLM

        return {Task.MLM: AutoModelForMaskedLM, Task.CLM: AutoModelForCausalLM,
                Task.IMAGE: AutoModelForImageClassification}[self]
