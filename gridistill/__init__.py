"""gridistill: Grid Distillation and DIVER refinement as a Prefect workflow."""

__version__ = "0.1.0"
