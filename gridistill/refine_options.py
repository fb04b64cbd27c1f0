"""DIVER's options, written once: the ``refine`` stage, ``gridistill run --refine``,
``gridistill refine`` and the refine-existing flow all take them from here.

Light on purpose (pydantic only, no diffusers): the CLI builds its options from these
fields before anything heavy is imported. Step indices are defined in
:mod:`gridistill.tasks.refine`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gridistill.distilled_sets import InputKind, Normalization, SubsetPreset
from gridistill.key_markers import WeightsInKey


def check_diver_parameters(*, num_steps: int, t_f: int, t_r: int | None, t_h: int, t_l: int,
                           cfg_scale: float) -> None:
    """Raise ValueError unless 0 ≤ t_f ≤ t_r ≤ N, 1 ≤ t_l ≤ t_h ≤ N and cfg_scale ≥ 1."""
    start_step = t_f if t_r is None else t_r
    if not 0 <= t_f <= start_step <= num_steps:
        raise ValueError(f"need 0 <= t_f <= t_r <= num_steps, got t_f={t_f}, t_r={start_step}, "
                         f"num_steps={num_steps}")
    if not 1 <= t_l <= t_h <= num_steps:
        raise ValueError(f"need 1 <= t_l <= t_h <= num_steps, got t_l={t_l}, t_h={t_h}, "
                         f"num_steps={num_steps}")
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be >= 1 (1 disables CFG), got {cfg_scale}")


class DiverOptions(BaseModel):
    """DIVER: the DiT and VAE, the DDIM step indices (1 = last step, N = noisiest) and the
    guidance scales. Checked as a whole when built, so a bad combination never reaches a GPU."""

    # Frozen: one instance is shared as a default and travels inside task parameters.
    model_config = ConfigDict(frozen=True)

    dit: Annotated[str, WeightsInKey] = Field(
        "facebook/DiT-XL-2-256", description="DiT: hub id or local directory.")
    vae: Annotated[str, WeightsInKey] = Field("stabilityai/sd-vae-ft-mse", description=(
        "AutoencoderKL: hub id or local directory."))
    num_steps: int = Field(50, ge=1, description="DIVER: DDIM steps N.")
    t_f: int = Field(25, ge=0, description="DIVER: noise z0 to this step (0: no noise).")
    t_r: int | None = Field(None, ge=0, description=(
        "DIVER: start the reverse process at this step (default t_f; the paper's literal "
        "reading: N)."))
    t_h: int = Field(40, ge=1, description="DIVER: highest step of the semantic phase.")
    t_l: int = Field(25, ge=1, description="DIVER: lowest step of the semantic phase.")
    gamma: float = Field(0.1, ge=0.0, description=(
        "DIVER: semantic-guidance scale (paper 0.1; 0.02 for NCFM sets; 0 disables it)."))
    cfg_scale: float = Field(4.0, description=(
        "DIVER: classifier-free guidance scale (1 disables it)."))

    @model_validator(mode="after")
    def _steps_in_order(self) -> DiverOptions:
        check_diver_parameters(num_steps=self.num_steps, t_f=self.t_f, t_r=self.t_r,
                               t_h=self.t_h, t_l=self.t_l, cfg_scale=self.cfg_scale)
        return self

    @property
    def start_step(self) -> int:
        """The step the reverse process starts at: t_r, or t_f when t_r is not given."""
        return self.t_f if self.t_r is None else self.t_r


class RefineJob(BaseModel):
    """``gridistill refine``: DIVER-refine a distilled set into an ImageFolder of PNGs."""

    input: str = Field(description=(
        "Distilled set: an ImageFolder, a gridistill run root, MTT/DATM .pt or .npz."))
    out: str = Field(description="Output ImageFolder (must be empty or new).")
    input_kind: InputKind = Field("auto", description="auto: detected from the input.")
    method: str | None = Field(None, description="Which distilled set of a run root (e.g. ssdim).")
    labels: str | None = Field(None, description=(
        "MTT labels file, when not labels_TAG.pt beside the images."))
    normalization: Normalization | None = Field(None, description=(
        "Mean/std the float tensor sets were normalised with (required for float .pt/.npz; "
        "MTT/DATM ImageNet subsets: imagenet)."))
    classes_preset: SubsetPreset | None = Field(None, description=(
        "Maps class i to its ImageNet-1K label, in the MTT/GLaD/DATM class order."))
    wnids: str | None = Field(None, description=(
        "File: one WNID per line (line i = class i), or a CSV with a wnid column."))
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description=(
        "auto, cpu, cuda or cuda:N (auto: cuda when available)."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "auto: bfloat16 on CUDA, float32 on CPU."))
    diver: DiverOptions = Field(DiverOptions(), description="DIVER's model and settings")
    seed: int = Field(0, description="Seeds every image's noise (independent of batch size).")
    batch_size: int = Field(32, ge=1, description=(
        "Images per forward; halved on out-of-memory."))

    @model_validator(mode="after")
    def _one_class_mapping(self) -> RefineJob:
        if self.classes_preset is not None and self.wnids is not None:
            raise ValueError("give classes_preset or wnids, not both")
        return self
