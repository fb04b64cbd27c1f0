"""Tolerances for floating-point results that two code paths compute in different orders.

BLAS and torch pick kernels, blocking and vector widths by CPU and by matrix shape, so the same
dot product can round differently on another machine, or for another batch or block size on
the same one. Tests compare such results within a bound that follows the dtype and the length
of the sums. Exact comparisons stay where the code promises them: the same inputs through the
same code path on the same machine (determinism and caching tests).
"""

from __future__ import annotations

import numpy as np


def dot_gap(length: int, dtype: type = np.float32) -> float:
    """Largest difference between two evaluations, in any summation order, of the dot product
    of two unit vectors with ``length`` entries: each lies within ``gamma_n = n u / (1 - n u)``
    of the exact value (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5), so two
    lie within twice that. float32, length 12: 1.4e-6."""
    unit_roundoff = float(np.finfo(dtype).eps) / 2
    return 2 * length * unit_roundoff / (1 - length * unit_roundoff)
