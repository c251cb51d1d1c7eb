"""Experiments built from the library: the paper's comparison (``reproduce``)."""

from quantizable.experiments.reproduce import FAMILIES, METHODS, SCALES, reproduce

__all__ = ["FAMILIES", "METHODS", "SCALES", "reproduce"]
