"""ImageNette / ImageWoof presets: the pooled distillation with the data chosen by name."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from gridistill.config import DistillConfig
from gridistill.flows.pooled import PoolOptions, distill_pooled

# fast.ai's releases, unpacked under ``datasets_root``: <folder>/train and <folder>/val,
# class folders named by WNID (so DIVER can map them to ImageNet-1K labels).
SUBSET_FOLDERS = {"imagenette": "imagenette2-320", "imagewoof": "imagewoof2-320"}


def subset_config(preset: Literal["imagenette", "imagewoof"], datasets_root: str,
                  runs_root: str, config: DistillConfig) -> DistillConfig:
    """``config`` with its data, test data and run root taken from the preset."""
    folder = f"{datasets_root.rstrip('/')}/{SUBSET_FOLDERS[preset]}"
    settings = config.model_dump(exclude={"data", "test_data", "class_list", "out"})
    return DistillConfig(**settings, data=f"{folder}/train", test_data=f"{folder}/val",
                         out=f"{runs_root.rstrip('/')}/{preset}-ipc{config.ipc}")


@flow(name="gridistill-subset", persist_result=False)
def subset_distill(preset: Literal["imagenette", "imagewoof"] = "imagenette",
                   datasets_root: str = "s3://gridistill-datasets",
                   runs_root: str = "s3://gridistill-runs",
                   config: DistillConfig | None = None,
                   pools: PoolOptions | None = None) -> dict[str, Any]:
    """Distil an ImageNet subset; ``config`` sets everything but the data and run root."""
    return distill_pooled(subset_config(preset, datasets_root, runs_root,
                                        config or DistillConfig()), pools)
