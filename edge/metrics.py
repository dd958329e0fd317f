"""Fidelity figures shared by the converter's parity checks, the tests and the benchmarks."""

from __future__ import annotations

import numpy as np


def psnr(reference: np.ndarray, test: np.ndarray, peak: float | None = None) -> float:
    """PSNR in dB of `test` against `reference`; peak defaults to max|reference| (as Apple's converter does)."""
    reference = np.asarray(reference, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if reference.shape != test.shape:
        raise ValueError(f"psnr: shapes differ: {reference.shape} vs {test.shape}")
    peak = float(np.abs(reference).max()) if peak is None else peak
    rmse = float(np.sqrt(np.mean((reference - test) ** 2)))
    return float(20 * np.log10((peak + 1e-5) / (rmse + 1e-10)))


def max_abs_diff(reference: np.ndarray, test: np.ndarray) -> float:
    return float(np.abs(np.asarray(reference, np.float64) - np.asarray(test, np.float64)).max())
