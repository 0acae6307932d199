"""Record one training step of the released Co-DETR (Sense-X/Co-DETR, mmdet 2.25 / mmcv 1.7 without
compiled ops) on the parity batch: every loss term, a digest of every parameter gradient, and every random
draw the step made (for codetr's side to replay). Runs inside the reference environment that
``setup_env.py`` makes; see docs/co-detr.md, "Parity with the release".

    ~/.cache/codetr-reference/venv/bin/python bench/release_reference/record.py co_dino_r50_lsj \\
        --release ~/.cache/codetr-reference/co-detr

Writes tests/data/release_parity/<model>.json.gz (the state-dict names and shapes, losses, gradient digests,
the release's package versions)
and <model>_draws.pt (the random draws, in the order they were made, with the calling line; also the order
decisions that nearly tied scores make: the query selection's top-k indices and the RPN proposals).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
CO_DINO = "projects/configs/co_dino/co_dino_5scale_r50_1x_coco.py"
CO_DEFORMABLE = "projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py"
# model name -> (release config, plain: without the auxiliary heads and positive queries (the base detector),
# padded: the batch of images of different sizes with padding masks (DETR augmentation) instead of the
# large-scale-jitter one, whose images fill the canvas)
MODELS = {"co_dino_r50_lsj": ("projects/configs/co_dino/co_dino_5scale_lsj_r50_1x_coco.py", False, False),
          "co_dino_r50": (CO_DINO, False, True),
          "dino_r50": (CO_DINO, True, True),
          "co_deformable_detr_r50": (CO_DEFORMABLE, False, True),
          "deformable_detr_r50": (CO_DEFORMABLE, True, True)}
RANDOM_FUNCTIONS = ("rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "multinomial",
                    "normal", "bernoulli")
PERMUTATION_PREFIX = 512  # entries of a random permutation kept (the samplers take at most 512)


def indices(values: torch.Tensor, bound: int) -> torch.Tensor:
    """Indices below ``bound`` in the smallest integer type that holds them (the recordings stay small)."""
    return values.to(torch.int16 if bound <= torch.iinfo(torch.int16).max else torch.int32)


class DrawRecorder:
    """Wraps torch's random functions: each call's output is kept with the release source line that made it."""

    def __init__(self, release: Path):
        self.release = str(release)
        self.draws: list[dict] = []
        self.originals = {name: getattr(torch, name) for name in RANDOM_FUNCTIONS}

    def _wrap(self, name: str, original):
        def recorded(*args, **kwargs):
            out = original(*args, **kwargs)
            caller = next((f for f in reversed(traceback.extract_stack()[:-1]) if f.filename.startswith(self.release)),
                          None)
            where = f"{Path(caller.filename).relative_to(self.release)}:{caller.lineno}" if caller else "?"
            value = out.detach().cpu()
            draw = {"function": name, "where": where, "shape": list(value.shape)}
            # a sampler uses at most the first few hundred entries of a permutation
            draw["value"] = indices(value[:PERMUTATION_PREFIX], len(value)) if name == "randperm" else value.clone()
            self.draws.append(draw)
            return out
        return recorded

    def _wrap_topk(self, original):
        """The query selection's top-k: its order decides which learned content query each proposal gets,
        and nearly tied scores can swap under float noise, so the chosen indices are kept too."""
        def recorded(*args, **kwargs):
            out = original(*args, **kwargs)
            caller = traceback.extract_stack()[-2]
            if caller.filename.startswith(self.release) and caller.filename.endswith("transformer.py"):
                where = f"{Path(caller.filename).relative_to(self.release)}:{caller.lineno}"
                self.draws.append({"function": "topk", "where": where, "shape": list(out[1].shape),
                                   "value": indices(out[1].detach().cpu(), args[0].shape[-1])})
            return out
        return recorded

    def __enter__(self) -> DrawRecorder:
        for name, original in self.originals.items():
            setattr(torch, name, self._wrap(name, original))
        self.original_topk = torch.topk
        torch.topk = self._wrap_topk(torch.topk)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.originals.items():
            setattr(torch, name, original)
        torch.topk = self.original_topk


def stay_on_cpu() -> None:
    """The release moves a few tensors to the GPU by hand (``.cuda()``, ``.to('cuda')``): keep them on the CPU."""
    to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):
        args = tuple("cpu" if isinstance(a, (str, torch.device)) and str(a).startswith("cuda") else a for a in args)
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.to = to_cpu


def record_proposals(model, draws: list[dict]) -> None:
    """Keeps the RPN proposals each RoI head receives (their order, at nearly tied scores, decides which
    boxes the replayed sampler permutation picks)."""
    for head in model.roi_head:
        forward_train = head.forward_train

        def recorded(x, img_metas, proposal_list, *args, forward_train=forward_train, **kwargs):
            for proposals in proposal_list:
                draws.append({"function": "proposals", "where": "roi_head", "shape": list(proposals.shape),
                              "value": proposals[:, :4].detach().cpu().clone()})
            return forward_train(x, img_metas, proposal_list, *args, **kwargs)

        head.forward_train = recorded


def build_release_model(release: Path, config: str, plain: bool = False, num_classes: int = 3):
    """The release's detector from its config, ``num_classes`` classes, no pretrained backbone, weights
    from :func:`release_parity.release_tensor`; ``plain``: its query head alone (no auxiliary heads, no
    positive-query embeddings)."""
    from mmcv import Config
    from mmdet.models import build_detector

    import projects.models  # noqa: F401  (registers the Co-DETR modules)
    from release_parity import release_tensor

    cfg = Config.fromfile(str(release / config))
    cfg.model.backbone.init_cfg = None
    cfg.model.query_head.num_classes = num_classes
    if plain:
        cfg.model.rpn_head, cfg.model.roi_head, cfg.model.bbox_head = None, [None], [None]
        cfg.model.query_head.transformer.num_co_heads = 0
    for head in filter(None, cfg.model.roi_head):
        head.bbox_head.num_classes = num_classes
    for head in filter(None, cfg.model.bbox_head):
        head.num_classes = num_classes
    model = build_detector(cfg.model)
    state = {k: release_tensor(k, tuple(v.shape)) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model


def record(name: str, release: Path, out_dir: Path) -> None:
    sys.path[:0] = [str(release), str(REPO / "tests")]
    stay_on_cpu()
    import mmcv
    from release_parity import digest, parity_batch, release_probe

    torch.manual_seed(0)
    config, plain, padded = MODELS[name]
    model = build_release_model(release, config, plain).train()
    batch = parity_batch(padded)
    # pad_shape as the released pipelines leave it: the image's own (Pad(size_divisor=1), then the batch is
    # padded without updating it) or the LSJ canvas (which every unpadded parity image fills)
    metas = [{"img_shape": (*size, 3), "ori_shape": (*size, 3), "pad_shape": (*size, 3), "flip": False,
              "scale_factor": torch.ones(4).numpy()} for size in batch["sizes"]]
    # the released pipelines never hand crowd boxes to the model (Collect drops gt_bboxes_ignore)
    boxes = [b[~c] for b, c in zip(batch["boxes"], batch["crowd"])]
    labels = [label[~c] for label, c in zip(batch["labels"], batch["crowd"])]
    with DrawRecorder(release) as recorder:
        record_proposals(model, recorder.draws)
        losses = model.forward_train(batch["images"], metas, boxes, labels)
    total, log_vars = model._parse_losses(losses)
    total.backward()
    probes = {k: release_probe(k, tuple(p.shape)) for k, p in model.named_parameters()}
    result = {
        "model": name, "config": config, "plain": plain, "padded": padded, "torch": torch.__version__, "mmcv": mmcv.__version__,
        "state_dict": {k: list(v.shape) for k, v in model.state_dict().items()},
        "losses": {k: float(v) for k, v in log_vars.items()},
        "gradients": {k: digest(p.grad, probes[k]) for k, p in model.named_parameters() if p.grad is not None},
        "no_gradient": [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(out_dir / f"{name}.json.gz", "wt") as f:
        f.write(json.dumps(result, separators=(",", ":"), sort_keys=True) + "\n")
    torch.save(recorder.draws, out_dir / f"{name}_draws.pt")
    print(f"{name}: {len(result['losses'])} loss terms, {len(result['gradients'])} gradients, "
          f"{len(recorder.draws)} random draws -> {out_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--release", type=Path, default=Path.home() / ".cache/codetr-reference/co-detr",
                        help="the Sense-X/Co-DETR sources (setup_env.py puts them here)")
    parser.add_argument("--out", type=Path, default=REPO / "tests/data/release_parity")
    args = parser.parse_args()
    record(args.model, args.release.resolve(), args.out)


if __name__ == "__main__":
    main()
