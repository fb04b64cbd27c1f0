"""Student networks trained from scratch on a (distilled) set: the dataset-distillation ConvNet,
IDC's ResNetAP-10, and timm's ResNet-18 / MobileNetV2 / EfficientNet-B0 / ViT-Tiny by name.

Plain torch: no workflow framework, no file layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STUDENTS: tuple[str, ...] = (
    "convnet_d3",
    "convnet_d4",
    "convnet_d5",
    "convnet_d6",
    "resnet18",
    "resnet18_lowres",
    "resnetap10",
    "mobilenetv2",
    "efficientnet_b0",
    "vit_tiny",
)



class ConvNet(nn.Module):
    """The dataset-distillation ConvNet (DC/DM/IDC/RDED): ``depth`` x [conv3x3, instance norm,
    ReLU, avgpool 2], then one linear layer on the flattened features.

    Instance norm is ``GroupNorm(width, width, affine=True)``, as in that literature.
    """

    def __init__(self, depth: int, num_classes: int, image_size: int, width: int = 128) -> None:
        super().__init__()
        feature_side = image_size // (2**depth)  # AvgPool2d floors, as DC's ConvNet does
        if feature_side < 1:
            raise ValueError(f"ConvNetD{depth} halves the resolution {depth} times: image_size "
                             f"must be at least {2**depth}, got {image_size}")
        layers: list[nn.Module] = []
        channels = 3
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * feature_side * feature_side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class _BasicBlockAP(nn.Module):
    """ResNet basic block whose stride-2 downsampling is a 2x2 average pool after the first conv
    (and in the shortcut), as in IDC's ``models/resnet_ap.py``."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(channels, channels)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, bias=False),
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                nn.GroupNorm(channels, channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(F.relu(self.norm1(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetAP10(nn.Module):
    """ResNetAP-10 with instance norm: the IDC / Minimax evaluation model.

    Every conv has stride 1; resolution drops only by average pooling. The stem depends on the
    input size as in IDC: <= 64 px a 3x3 conv, <= 128 px a 3x3 conv + avgpool 2, larger a 7x7
    conv + avgpool 4. Four stages of one block each, widths 64-128-256-512.
    """

    def __init__(self, num_classes: int, image_size: int, width: int = 64) -> None:
        super().__init__()
        if image_size <= 64:
            stem: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False)]
            stem_pool: nn.Module = nn.Identity()
        elif image_size <= 128:
            stem = [nn.Conv2d(3, width, 3, padding=1, bias=False)]
            stem_pool = nn.AvgPool2d(2)
        else:
            stem = [nn.Conv2d(3, width, 7, padding=3, bias=False)]
            stem_pool = nn.AvgPool2d(4)
        self.stem = nn.Sequential(*stem, nn.GroupNorm(width, width), nn.ReLU(inplace=True),
                                  stem_pool)
        widths = (width, width * 2, width * 4, width * 8)
        blocks, in_channels = [], width
        for i, channels in enumerate(widths):
            blocks.append(_BasicBlockAP(in_channels, channels, stride=1 if i == 0 else 2))
            in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # IDC's init: N(0, sqrt(2 / (k*k*out_channels))).
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_student(name: str, num_classes: int, image_size: int) -> nn.Module:
    """A randomly initialised student network by name (one of :data:`STUDENTS`).

    ``resnet18_lowres`` is timm's ResNet-18 with a 3x3 stride-1 stem and no max-pool (RDED's
    ``resnet18_modified``), for inputs of 64 px or less. ``vit_tiny`` uses 16 px patches from
    64 px up and 4 px patches below.
    """
    import timm

    if name.startswith("convnet_d") and name[len("convnet_d"):].isdigit():
        return ConvNet(int(name[len("convnet_d"):]), num_classes, image_size)
    if name == "resnetap10":
        return ResNetAP10(num_classes, image_size)
    if name in ("resnet18", "resnet18_lowres"):
        model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes)
        if name == "resnet18_lowres":
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        return model
    if name == "mobilenetv2":
        return timm.create_model("mobilenetv2_100", pretrained=False, num_classes=num_classes)
    if name == "efficientnet_b0":
        return timm.create_model("efficientnet_b0", pretrained=False, num_classes=num_classes)
    if name == "vit_tiny":
        patch = 16 if image_size >= 64 else 4
        if image_size % patch:
            raise ValueError(f"vit_tiny needs image_size divisible by {patch}, got {image_size}")
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                                 img_size=image_size, patch_size=patch)
    raise ValueError(f"unknown student {name!r}; choose one of {', '.join(STUDENTS)}")
