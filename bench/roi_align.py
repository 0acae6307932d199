"""codetr's CPU RoIAlign (a sparse matrix, codetr/ops/roi_align.py) against torchvision's kernel:
forward and backward times on the shapes the Faster R-CNN auxiliary head sees, outputs and
gradients checked equal in the same run.

RoIs are drawn as the RoI head's finest level receives them (mmdet level mapping with finest
scale 112: sqrt(area) below 224 px), log-uniform sizes from 16 px, aspect ratio 1/2 to 2,
aligned=True, adaptive sampling (sampling_ratio=0), 7x7 output, stride 8.

    python bench/roi_align.py --warmup 3 --repeats 11
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from common import append_result, machine, write_json  # noqa: E402

from codetr.ops.roi_align import roi_align  # noqa: E402

# name -> (images, channels, image height, image width, RoIs)
SHAPES = {
    "tiny": (4, 64, 288, 288, 1200),  # batch 4 of the tiny config: ~300 sampled RoIs per image
    "r50": (2, 256, 800, 1066, 1024),  # batch 2 of the R50 config: 512 sampled RoIs per image
}


def random_rois(generator: torch.Generator, count: int, images: int, height: int, width: int) -> torch.Tensor:
    """(count, 5) rows of (image index, x1, y1, x2, y2), clipped to the image."""
    scale = torch.exp(torch.empty(count).uniform_(math.log(16), math.log(224), generator=generator))
    ratio = torch.exp(torch.empty(count).uniform_(math.log(0.5), math.log(2.0), generator=generator))
    w, h = scale * ratio.sqrt(), scale / ratio.sqrt()
    cx, cy = torch.rand(count, generator=generator) * width, torch.rand(count, generator=generator) * height
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    boxes = torch.maximum(torch.minimum(boxes, torch.tensor([width, height, width, height])), torch.zeros(4))
    return torch.cat([torch.randint(0, images, (count, 1), generator=generator).float(), boxes], 1)


def time_op(op, features: torch.Tensor, rois: torch.Tensor, grad: torch.Tensor, warmup: int,
            repeats: int) -> tuple[float, float]:
    """Median seconds of the forward and of the backward."""
    forward, backward = [], []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        pooled = op(features, rois, 7, 1 / 8, 0, True)
        middle = time.perf_counter()
        torch.autograd.grad(pooled, features, grad)
        if i >= warmup:
            forward.append(middle - start)
            backward.append(time.perf_counter() - middle)
    return statistics.median(forward), statistics.median(backward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/roi_align.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.shapes:
        images, channels, height, width, count = SHAPES[name]
        generator = torch.Generator().manual_seed(0)
        features = torch.randn(images, channels, height // 8, width // 8, generator=generator, requires_grad=True)
        rois = random_rois(generator, count, images, height, width)
        grad = torch.randn(count, channels, 7, 7, generator=generator)
        ours, reference = roi_align(features, rois, 7, 1 / 8, 0, True), torchvision.ops.roi_align(
            features, rois, 7, 1 / 8, 0, True)
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.autograd.grad(ours, features, grad)[0],
                                   torch.autograd.grad(reference, features, grad)[0], rtol=1e-4, atol=1e-4)
        results[name] = {"features": list(features.shape), "rois": count}
        for op_name, op in (("torchvision", torchvision.ops.roi_align), ("codetr", roi_align)):
            forward, backward = time_op(op, features, rois, grad, args.warmup, args.repeats)
            results[name][op_name] = {"forward_s": forward, "backward_s": backward, "total_s": forward + backward}
        print(name, results[name], flush=True)
    write_json(args.out, {"results": results})
    summary = "; ".join(
        f"{name} ({r['rois']} RoIs on {r['features']}): forward + backward torchvision "
        f"{r['torchvision']['total_s'] * 1000:.0f} ms (forward {r['torchvision']['forward_s'] * 1000:.0f}, backward "
        f"{r['torchvision']['backward_s'] * 1000:.0f}), codetr {r['codetr']['total_s'] * 1000:.0f} ms (forward "
        f"{r['codetr']['forward_s'] * 1000:.0f}, backward {r['codetr']['backward_s'] * 1000:.0f}; "
        f"x{r['torchvision']['total_s'] / r['codetr']['total_s']:.1f} faster)"
        for name, r in results.items())
    protocol = (f"forward + backward of RoIAlign 7x7, aligned, sampling_ratio=0, stride 8, float32, {args.threads} "
                f"threads, warm-up {args.warmup}, median of {args.repeats}, outputs and gradients checked equal; "
                f"{machine()}")
    append_result("roi_align", protocol, summary)
    print(summary)


if __name__ == "__main__":
    main()
