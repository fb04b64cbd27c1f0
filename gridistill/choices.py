"""The closed sets of the flow parameters, as ``Literal`` types: pydantic refuses any other
value (naming the allowed ones) and the Prefect UI renders each as a drop-down.

A plain module on purpose: :mod:`gridistill.config` imports it without pulling in the stage
modules (prefect, torch models, timm). Each set mirrors a table in the module that implements
it; ``tests/test_config.py`` checks they stay equal.
"""

from __future__ import annotations

from typing import Literal

# gridistill.tasks.selectors.SELECTION_METHODS: the grid selectors.
Selector = Literal["ssdim", "random", "kcenter", "herding", "kmeans", "facility", "logdet"]
# ... plus gridistill.tasks.select.REAL_IMAGES: IPC real photos per class instead of grids.
SelectionMethod = Literal[Selector, "random-real"]
# gridistill.tasks.enhance.ENHANCE_BACKENDS
EnhanceBackend = Literal["none", "bilinear", "bicubic", "sd-turbo"]
# gridistill.tasks.embed.EMBEDDERS
Embedder = Literal["auto", "clip", "efficientnet-lite0", "pixels-pca"]
# the keys of gridistill.tasks.protocols.PROTOCOLS
EvalProtocol = Literal["rded", "minimax", "cpu-small", "cpu-soft"]
# gridistill.tasks.students.STUDENTS
Student = Literal["convnet_d3", "convnet_d4", "convnet_d5", "convnet_d6", "resnet18",
                  "resnet18_lowres", "resnetap10", "mobilenetv2", "efficientnet_b0", "vit_tiny"]
# gridistill.models.IMAGENET_CLASSIFIERS: packaged ImageNet-1K networks (no training needed).
ImageNetClassifier = Literal["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
# A soft-label teacher: a packaged classifier, or a student architecture trained on the train split.
Teacher = Literal[Student, ImageNetClassifier]
