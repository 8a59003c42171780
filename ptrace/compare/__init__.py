"""Comparing two runs, engine-free: which positions align (``align``), token agreement and KL
(``tokens``), per-tensor errors (``tensors``, ``metrics``), pass/warn/fail (``thresholds``),
where it starts (``localize``), dtype changes against a calibration run (``calibration``), and
one verdict for a pair whichever command asks (``judgment``); the result is plain data
(``results``) with a one-line ``summary``."""

from ptrace.compare.bundles import combine, compare
from ptrace.compare.results import Comparison

__all__ = ["Comparison", "combine", "compare"]
