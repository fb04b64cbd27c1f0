"""SSDIM's weights, written once: ``gridistill run``, the flows and the select stage take them
from here. Light on purpose (pydantic only), like :mod:`gridistill.refine_options`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SsdimWeights(BaseModel):
    """F(S) = coverage_weight * coverage + logdet_weight * log-det + spectral_weight * spectral
    energy (alpha, beta, gamma in the paper). The defaults are the paper's; its Table 6
    ablates them, e.g. (1, 0, 0) for coverage only."""

    # Frozen: one instance is shared as a default and travels inside task parameters.
    model_config = ConfigDict(frozen=True)

    coverage_weight: float = Field(1.0, ge=0.0, description=(
        "SSDIM alpha: weight of coverage, sum over the class of each image's best similarity "
        "to the selection."))
    logdet_weight: float = Field(0.6, ge=0.0, description=(
        "SSDIM beta: weight of log det(K_SS + eps I), the selection's diversity."))
    spectral_weight: float = Field(0.3, ge=0.0, description=(
        "SSDIM gamma: weight of the selection's spectral energy (top-32 eigenpairs), how "
        "typical its images are."))
