"""Outlier analysis (paper section 3 and the metrics of its tables): inf-norm, kurtosis, where outliers sit, and the
no-op mechanism behind them (sink share, value drain, residual peak, gates, clipped zeros)."""

from quantizable.analysis.analyze import analyze
from quantizable.analysis.mechanism import MechanismStats
from quantizable.analysis.metrics import OUTLIER_STD, inf_norm, kurtosis, outlier_mask
from quantizable.analysis.recording import recording, transformer_blocks

__all__ = ["OUTLIER_STD", "MechanismStats", "analyze", "inf_norm", "kurtosis", "outlier_mask", "recording",
           "transformer_blocks"]
