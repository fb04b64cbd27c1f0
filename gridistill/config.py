"""The flow's parameters: one typed model, so the Prefect UI renders a form and the CLI
builds its options from the same fields."""

from __future__ import annotations

import os
import re
import typing
from importlib import resources
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, field_validator, model_validator

from gridistill.choices import (
    Embedder,
    EnhanceBackend,
    EvalProtocol,
    SelectionMethod,
    Student,
    Teacher,
)
from gridistill.refine_options import DiverOptions
from gridistill.select_options import SsdimWeights
from gridistill.storage import content_key

# Option names that hold credentials (s3fs: key, secret, token; others: password...).
CREDENTIAL_NAME = re.compile(r"secret|token|password|passwd|credential|(^|_)key$", re.IGNORECASE)

Stage = Literal["load", "embed", "select", "grids", "enhance", "refine", "teacher", "evaluate"]
STAGES: tuple[Stage, ...] = typing.get_args(Stage)


def demo_data_root() -> str:
    """The embedded default: a small real ImageNette sample shipped with the package."""
    return str(resources.files("gridistill") / "demo_data" / "imagenette-mini")


class DistillConfig(BaseModel):
    """Distil an image dataset into IPC grid images per class, then evaluate them."""

    data: str | None = Field(None, description=(
        "Training images: an ImageFolder directory (one sub-folder per class) or a manifest "
        "(.csv/.parquet with path,label), local or any fsspec URL (s3://...). "
        "Default: the embedded ImageNette sample."))
    test_data: str | None = Field(None, description=(
        "Real test images in the same layout. Default: the embedded sample's test split with "
        "the embedded data, else a fixed seeded hold-out share of each class."))
    class_list: str | None = Field(None, description=(
        "File fixing the class order (one name/WNID per line, or a CSV with a wnid column). "
        "Default: sorted folder names; the embedded sample uses its classes.csv."))
    out: str | None = Field(None, description=(
        "Run root (local path or fsspec URL). Default: a folder under ./runs named after the "
        "data and a hash of its location, so a rerun of the same data reuses every finished "
        "stage."))
    ipc: int = Field(1, ge=1, description="Distilled images (grids) per class.")
    grid_size: int = Field(4, ge=1, description="L: each grid holds L x L selected images.")
    # Plain list defaults (pydantic copies them per instance): a default_factory would not
    # appear in the JSON schema, so the UI form would show an empty list.
    methods: list[SelectionMethod] = Field(
        default=["ssdim", "random", "random-real"], min_length=1, description=(
            "Selection methods to distil and compare: each but random-real fills grids; "
            "random-real takes IPC random photos per class, the field's random baseline."))
    grid_selection: Literal["sequential", "joint"] = Field("sequential", description=(
        "sequential: each grid is selected from what earlier grids left of the class (the "
        "paper); joint: IPC x L x L images are selected at once and dealt into grids."))
    typical_share: float = Field(0.5, gt=0.0, le=1.0, description=(
        "Selection methods pick from each class's most typical share of images (cosine to "
        "the class's mean embedding): the typical half by default, which trained better in "
        "benchmarks/distill_imagenette.md; 1: the whole class, as in the paper. The random "
        "baselines (random, random-real) always draw from the whole class."))
    ssdim: SsdimWeights = Field(SsdimWeights(), description=(
        "SSDIM's weights (the paper's by default)"))
    seed: int = Field(0, description="Seed for selection, hold-out split and training.")
    holdout_share: float = Field(0.2, ge=0.0, lt=1.0, description=(
        "Share of each class held out for testing when no test data is given."))
    embedder: Embedder = Field(
        "auto", description=(
            "auto: CLIP when its weights are present, else the packaged ImageNet-1K "
            "EfficientNet-Lite0, else pixels-pca with a loud warning."))
    clip_model: str = Field("ViT-B-32", description="open_clip model name.")
    clip_pretrained: str = Field("laion2b_s34b_b79k", description=(
        "open_clip pretrained tag, or a local checkpoint file."))
    grid_resolution: int = Field(224, ge=8, description="Storage resolution of each grid (px).")
    enhance: list[EnhanceBackend] = Field(default=["bilinear"], min_length=1, description=(
        "Detail enhancement backend(s). Several run an ablation: each method is evaluated "
        "once per backend, named method+backend."))
    enhance_scale: int = Field(4, ge=1, description="Upscaling factor of the enhancement.")
    refine: bool = Field(False, description=(
        "Run DIVER refinement on the enhanced grids and evaluate before and after it."))
    diver: DiverOptions = Field(DiverOptions(), description=(
        "DIVER refinement (with refine): its DiT and VAE, step indices and guidance scales."))
    eval_student: Student = Field("convnet_d3", description=(
        "Student network trained on the grids."))
    eval_protocol: EvalProtocol = Field("cpu-small", description=(
        "Evaluation protocol preset: rded and cpu-soft train on a teacher's soft labels, "
        "minimax and cpu-small on hard labels."))
    eval_image_size: int | None = Field(None, ge=8, description=(
        "Training/test resolution of the student (default: the protocol's)."))
    eval_epochs: int | None = Field(None, ge=1, description="Override the protocol's epochs.")
    eval_seeds: int = Field(3, ge=1, description="Students trained per set (mean ± std).")
    teacher: Teacher = Field("resnet18", description=(
        "Soft-label protocols (rded, cpu-soft): efficientnet-lite0 (the packaged ImageNet-1K "
        "network, its logits restricted to the dataset's WNIDs), or an architecture trained "
        "on the real training images (for data outside ImageNet)."))
    teacher_checkpoint: str | None = Field(None, description=(
        "Soft-label protocols: a saved teacher to use instead (class order is checked)."))
    classifier_checkpoint: str | None = Field(None, description=(
        "EfficientNet-Lite0 weights (lukemelas or timm layout) to use instead of the packaged "
        "ones, for the efficientnet-lite0 embedder and teacher."))
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description=(
        "auto, cpu, cuda or cuda:N (auto: cuda when available)."))
    max_workers: int | None = Field(None, ge=1, description=(
        "Concurrent class tasks (default: the machine's CPU count, at most 8)."))
    storage_options: dict[str, Any] = Field(default_factory=dict, description=(
        "fsspec options for the run root and data, e.g. {\"endpoint_url\": ...}. "
        "Never put credentials here: use the environment / AWS credential chain."))
    progress: bool = Field(True, description="Show progress bars on the terminal.")
    task_runner: Literal["thread", "dask", "ray"] = Field("thread", description=(
        "Runs the per-class fan-out: a thread pool, prefect-dask's DaskTaskRunner or "
        "prefect-ray's RayTaskRunner (extras gridistill[dask] / gridistill[ray])."))
    task_runner_address: str | None = Field(None, description=(
        "Address of an existing Dask scheduler (tcp://host:8786) or Ray cluster "
        "(ray://host:10001). Default: start a local cluster of max_workers workers."))
    aws_credentials_block: str | None = Field(None, description=(
        "Name of a Prefect Secret block holding {aws_access_key_id, aws_secret_access_key"
        "[, aws_session_token]}; each worker loads it into its environment. Default: the "
        "environment / AWS credential chain."))
    force_from: Stage | None = Field(None, description=(
        "Recompute this stage and every later one (for force_classes), reusing the rest."))
    force_classes: list[str] | None = Field(None, description=(
        "Classes that force_from applies to (default: all)."))

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        # These options travel as flow and task parameters, shown in the UI and the logs.
        def names(value: Any) -> list[str]:
            if not isinstance(value, dict):
                return []
            return [k for k, v in value.items() if CREDENTIAL_NAME.search(str(k))] + [
                n for v in value.values() for n in names(v)]

        found = names(options)
        if found:
            raise ValueError(f"storage_options must not hold credentials ({found}): give them "
                             "through the environment, the AWS credential chain, or "
                             "aws_credentials_block")
        return options

    @model_validator(mode="after")
    def _fill_defaults(self) -> DistillConfig:
        if self.data is None:
            demo = demo_data_root()
            self.data = f"{demo}/train"
            self.test_data = self.test_data or f"{demo}/test"
            self.class_list = self.class_list or f"{demo}/classes.csv"
        if self.out is None:
            parts = [p for p in self.data.split("/") if p and not p.endswith(":")]
            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts[-2:]))
            self.out = os.path.join("runs", f"{name}-{content_key(self.data, self.test_data)[:8]}")
        return self

    def forced(self, stage: Stage, classes: list[str]) -> list[bool]:
        """Per class: whether this run must recompute ``stage`` rather than reuse it."""
        if self.force_from is None or STAGES.index(stage) < STAGES.index(self.force_from):
            return [False] * len(classes)
        return [self.force_classes is None or name in self.force_classes for name in classes]

    def report_summary(self, embedder: str, with_teacher: bool) -> dict[str, Any]:
        """The setup lines at the top of the run report."""
        teacher = f", teacher {self.teacher}" if with_teacher else ""
        return {
            "data": self.data, "test data": self.test_data or "held out from data",
            "ipc": self.ipc, "embedder": embedder,
            "grid": f"{self.grid_size}x{self.grid_size} at {self.grid_resolution}px, "
                    f"{self.grid_selection} selection"
                    + (f" from each class's most typical {self.typical_share:.0%} (random "
                       "baselines: the whole class)" if self.typical_share < 1 else ""),
            "ssdim weights": f"coverage {self.ssdim.coverage_weight:g}, "
                             f"log-det {self.ssdim.logdet_weight:g}, "
                             f"spectral {self.ssdim.spectral_weight:g}",
            "enhance": f"{', '.join(self.enhance)} x{self.enhance_scale}",
            "refine": f"DIVER ({self.diver.dit}, t_f={self.diver.t_f}, "
                      f"t_r={self.diver.start_step}, gamma={self.diver.gamma})"
            if self.refine else "off",
            "student": f"{self.eval_student}, {self.eval_protocol} protocol, "
                       f"{self.eval_seeds} seeds{teacher}",
            "run root": self.out}

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def worker_count(self) -> int:
        return self.max_workers or min(os.cpu_count() or 1, 8)
