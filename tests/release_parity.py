"""What the training-parity comparison with the released Co-DETR shares on both sides: deterministic
weights in the release's naming, the fixed batch, and the gradient digest. Imported by the test suite
(codetr's side) and by ``bench/release_reference/record.py`` (the release's side, in its own environment),
so it needs nothing but torch.

Weights and gradient probes are functions of a parameter's release name and shape alone, so neither
side stores them: codetr converts the release-format weights (and probes) with its converter.
"""

from __future__ import annotations

import re
import zlib

import torch
from torch import Tensor

DATA_DIR = "tests/data/release_parity"
CLASSIFIER = re.compile(r"(cls_branches\.\d+|atss_cls|rpn_cls)\.(weight|bias)$")
PRIOR_BIAS = -4.595  # log(0.01 / 0.99)


def _generator(name: str, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{salt}:{name}".encode()))


def release_tensor(name: str, shape: tuple[int, ...]) -> Tensor:
    """A deterministic float32 value for the release's state-dict entry ``name``: batch-norm statistics
    near (0, 1), norm scales near 1, biases and embeddings small, weights ~ N(0, 1 / fan_in); classifiers
    with the release's prior bias and a wider spread."""
    g = _generator(name, "weight")
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.int64)
    if leaf == "running_var":
        return torch.rand(shape, generator=g) + 0.5
    if leaf == "running_mean":
        return torch.randn(shape, generator=g) * 0.1
    fan_in = 1
    for size in shape[1:]:
        fan_in *= size
    if CLASSIFIER.search(name):
        # the release's classifier initialisation (prior probability 0.01), spread so that no two scores tie
        # (tied scores leave top-k, sort and NMS orders to the implementation)
        if leaf == "bias":
            return torch.randn(shape, generator=g) * 0.02 + PRIOR_BIAS
        return torch.randn(shape, generator=g) * 4.0 / fan_in ** 0.5
    if len(shape) == 1:
        is_scale = leaf == "weight"
        return torch.randn(shape, generator=g) * (0.1 if is_scale else 0.02) + (1.0 if is_scale else 0.0)
    return torch.randn(shape, generator=g) / fan_in ** 0.5


def release_probe(name: str, shape: tuple[int, ...]) -> Tensor:
    """A fixed N(0, 1) tensor per parameter: the gradient digest's third number is its dot product with
    the gradient (equal across layouts that the converter only reshapes or permutes)."""
    return torch.randn(shape, generator=_generator(name, "probe"))


def digest(grad: Tensor, probe: Tensor) -> list[float]:
    """[sum, sum of absolute values, dot product with ``probe``] of a gradient, in float64."""
    g = grad.double()
    return [float(g.sum()), float(g.abs().sum()), float((g * probe.double()).sum())]


PADDED_SIZES = [(160, 192), (158, 160), (120, 144)]  # (height, width) of each image of the padded batch


def parity_batch(padded: bool = False) -> dict:
    """The fixed training batch: three images on one 160 x 192 canvas (ImageNet-normalised values), the first
    with three objects of which one is a crowd, the second with two, the third with none. Unpadded, each image
    fills the canvas (the large-scale-jitter models, whose padded canvas is the image); ``padded``, the images
    have the sizes of ``PADDED_SIZES`` and zeros beyond them (the DETR-augmentation models, with padding masks).
    Boxes xyxy pixels. Returns {"images": (3, 3, 160, 192), "sizes": [(h, w)], "boxes": [(n, 4)],
    "labels": [(n,)], "crowd": [(n,) bool]}."""
    g = torch.Generator().manual_seed(33)
    images = torch.randn(3, 3, 160, 192, generator=g)
    sizes = PADDED_SIZES if padded else [tuple(images.shape[-2:])] * 3
    for image, (h, w) in zip(images, sizes):
        image[:, h:] = 0
        image[:, :, w:] = 0
    boxes = [torch.tensor([[12.0, 20.5, 90.0, 110.0], [100.0, 30.0, 180.0, 70.25], [40.0, 60.0, 70.0, 150.0]]),
             torch.tensor([[5.0, 5.0, 60.0, 40.0], [70.5, 80.0, 150.0, 155.0]]),
             torch.zeros(0, 4)]
    labels = [torch.tensor([0, 2, 1]), torch.tensor([1, 1]), torch.zeros(0, dtype=torch.int64)]
    crowd = [torch.tensor([False, False, True]), torch.tensor([False, False]), torch.zeros(0, dtype=torch.bool)]
    return {"images": images, "sizes": sizes, "boxes": boxes, "labels": labels, "crowd": crowd}
