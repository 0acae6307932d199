"""One training step of codetr against the released Co-DETR (Sense-X/Co-DETR) on the same weights and batch.

``bench/release_reference/record.py`` ran the release on the batch of ``tests/release_parity.py`` with weights
that are a function of each release parameter's name, and stored every loss term, a digest of every parameter
gradient and every random draw (tests/data/release_parity/). Here codetr converts the same release-format
weights with its checkpoint converter, replays the release's draws (denoising noise, RPN / RoI samplers,
positive-query padding) and the orders that float noise decides (query selection, RPN proposals), runs its
training step and compares. See docs/co-detr.md, "Parity with the release".
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from codetr.config_parsing import load_config
from codetr.convert.mmdet import convert_checkpoint
from codetr.models.build import build_model
from codetr.structures import Batch, Target
from release_parity import DATA_DIR, digest, parity_batch, release_probe, release_tensor

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
DATA = Path(__file__).parents[2] / DATA_DIR
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
# float32 rounding, not a deviation: codetr's step in float64 agrees with the release's (float32) within 6.4e-5 on
# every gradient, while codetr's own float32 step is up to 1.6e-4 off its float64 one on the stride-8 backbone
# stage (its frozen batch norm folds scale and shift in another order than torch's batch_norm kernel)
GRAD_RTOL_FLOAT32 = {"backbone.layer2.": 2e-4}
SCORE_ATOL = 1e-4  # float noise of the encoder's class logits (1e-5 between the release's own runs)
BOX_ATOL = 1e-2  # pixels, float noise of the RPN's proposal boxes
# the recordings (tests/data/release_parity/<name>.json.gz, <name>_draws.pt) -> codetr's config
CONFIGS = {"co_dino_r50_lsj": "co_dino_5scale_lsj_r50_1x_coco", "co_dino_r50": "co_dino_5scale_r50_1x_coco",
           "dino_r50": "dino_5scale_r50_1x_coco", "co_deformable_detr_r50": "co_deformable_detr_r50_1x_coco",
           "deformable_detr_r50": "deformable_detr_r50_1x_coco"}
AUX_HEADS = {"0": "rcnn", "1": "atss"}  # the release numbers its auxiliary heads in config order


def codetr_loss_name(name: str) -> str | None:
    """The release's loss name -> codetr's; None for the total and the RoI head's accuracy (not losses)."""
    if name == "loss" or name.startswith("acc"):
        return None
    name = name.replace("loss_iou", "loss_giou")
    if m := re.fullmatch(r"loss_rpn_(cls|bbox)", name):
        return f"rpn.loss_{m[1]}"
    if m := re.fullmatch(r"(d\d\.)?dn_(loss_\w+)", name):
        return f"{m[1] or ''}dn.{m[2]}"
    if m := re.fullmatch(r"enc_(loss_\w+)", name):
        return f"enc.{m[1]}"
    if m := re.fullmatch(r"(d\d\.)?(loss_\w+?)_aux(\d)", name):
        return f"{m[1] or ''}{m[2]}_pos_{AUX_HEADS[m[3]]}"
    if m := re.fullmatch(r"(loss_\w+?)(\d)", name):
        return f"{AUX_HEADS[m[2]]}.{m[1]}"
    return name


class ReplayedDraws:
    """Patches torch.rand / randint / randperm / topk for the duration of codetr's step so that each returns the
    release's recorded draw: the denoising noise in the release's order (label flips, flipped labels, box signs,
    box factors; the release draws a new label only where a label flips), and each sampler permutation by its
    length (a permutation the release did not draw, because its sampler kept the whole pool, is the identity:
    the same subset).

    Two orders that nearly tied scores decide are replayed too, after checking that they are codetr's own up to
    float noise: the query selection's top-k (``topk``: the recorded indices must select scores equal to
    codetr's k best within ``SCORE_ATOL``) and the RPN proposals each RoI head samples from (``proposals``: each
    recorded box must match one of codetr's within ``BOX_ATOL`` pixels, one to one (an optimal assignment); codetr's boxes are
    returned in the release's order). The release's own top-k order changes with the number of CPU threads."""

    def __init__(self, draws: list[dict], label_noise: float):
        self.denoising = [d for d in draws if "query_denoising" in d["where"]]
        self.permutations = [d for d in draws if d["function"] == "randperm"]
        self.selections = [d for d in draws if d["function"] == "topk"]
        self.proposal_lists = [d for d in draws if d["function"] == "proposals"]
        self.label_noise = label_noise
        self.flip_draw: torch.Tensor | None = None

    def rand(self, *size, generator=None, device=None, dtype=None, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        draw = self.denoising.pop(0)
        assert draw["function"] == "rand_like", draw["where"]
        self.flip_draw = draw["value"].reshape(shape).to(dtype or torch.float32)
        return self.flip_draw

    def randint(self, low, high, size, generator=None, device=None, **kwargs):
        draw = self.denoising.pop(0)
        assert draw["function"] == "randint_like", draw["where"]
        if high == 2:  # box corner signs
            return draw["value"].reshape(size).long()
        labels = torch.zeros(size, dtype=torch.long)
        labels[self.flip_draw < self.label_noise * 0.5] = draw["value"].long()
        return labels

    def randperm(self, n, generator=None, **kwargs):
        for i, draw in enumerate(self.permutations):
            if draw["shape"][0] == n:
                head = self.permutations.pop(i)["value"].long()
                rest = torch.ones(n, dtype=torch.bool)
                rest[head] = False
                return torch.cat([head, torch.nonzero(rest).squeeze(1)])
        return torch.arange(n)

    def topk(self, scores: torch.Tensor, k: int, dim: int = -1, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """The query selection's top-k: scores (B, N) -> (values, indices) (B, k) at the release's indices."""
        draw = self.selections.pop(0)
        assert dim == 1 and list(draw["shape"]) == [scores.shape[0], k], (draw["where"], scores.shape, k)
        index = draw["value"].long()
        values = scores.gather(1, index)
        own = self.saved[3](scores, k, dim=1)[0]
        assert torch.allclose(values, own, rtol=0, atol=SCORE_ATOL), (values - own).abs().max()
        return values, index

    def proposals(self, boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        """codetr's RPN proposals (P, 4) xyxy per image, put in the release's order."""
        out = []
        for own in boxes:
            recorded = self.proposal_lists.pop(0)["value"]
            assert recorded.shape == own.shape, (recorded.shape, own.shape)
            distance = torch.cdist(recorded.double(), own.double(), p=float("inf"))
            rows, match = linear_sum_assignment(distance.numpy())  # one to one (clipping makes equal boxes)
            assert distance[rows, match].max() < BOX_ATOL, distance[rows, match].max()
            out.append(own[torch.from_numpy(match)])
        return out

    def __enter__(self) -> ReplayedDraws:
        self.saved = torch.rand, torch.randint, torch.randperm, torch.topk
        torch.rand, torch.randint, torch.randperm, torch.topk = self.rand, self.randint, self.randperm, self.topk
        return self

    def __exit__(self, *exc) -> None:
        torch.rand, torch.randint, torch.randperm, torch.topk = self.saved

    @property
    def unused(self) -> list[tuple[str, list[int]]]:
        """(source line, shape) of each recorded draw not replayed."""
        left = self.denoising + self.permutations + self.selections + self.proposal_lists
        return [(d["where"], d["shape"]) for d in left]


def release_groups(sources: dict[str, list[str]]) -> list[tuple[list[str], list[str]]]:
    """(release names, codetr names) of the tensors the converter ties together (one to one, or a split or a
    concatenation), as connected groups."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for target, names in sources.items():
        for name in names:
            parent[find("r:" + name)] = find("c:" + target)
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for node in list(parent):
        release, codetr = groups.setdefault(find(node), ([], []))
        (release if node.startswith("r:") else codetr).append(node[2:])
    return list(groups.values())


def training_step(name: str) -> tuple[dict, dict[str, float], dict[str, list[float]], list]:
    """codetr's training step on the parity batch with the release's weights and draws: (the release's record,
    codetr's losses, codetr's gradient digests by codetr name, the converter's name groups)."""
    with gzip.open(DATA / f"{name}.json.gz", "rt") as f:
        reference = json.load(f)
    draws = torch.load(DATA / f"{name}_draws.pt", weights_only=True)
    cfg = load_config(CONFIGS[name], ["model.num_classes=3", "model.backbone.weights=null"]).model
    # the release's query heads build the auxiliary pyramid's last level even without auxiliary heads, where
    # nothing uses it (no gradient): a plain model leaves it out
    shapes = {k: tuple(s) for k, s in reference["state_dict"].items()
              if not (reference.get("plain") and k.startswith("query_head.downsample."))}
    weights = convert_checkpoint({k: release_tensor(k, s) for k, s in shapes.items()}, cfg, keep_aux=True)
    assert weights.ok, (weights.missing, weights.unused, weights.unexpected, weights.problems)
    params = set(reference["gradients"])
    probes = convert_checkpoint({k: release_probe(k, s) if k in params else release_tensor(k, s)
                                 for k, s in shapes.items()}, cfg, keep_aux=True)
    model = build_model(cfg).train()
    model.load_state_dict(weights.state_dict)
    data = parity_batch(reference.get("padded", False))
    targets = [Target(b[~c], lab[~c]) for b, lab, c in zip(data["boxes"], data["labels"], data["crowd"])]
    masks = torch.ones(len(targets), *data["images"].shape[-2:], dtype=torch.bool)
    for mask, (h, w) in zip(masks, data["sizes"]):
        mask[:h, :w] = False
    batch = Batch(data["images"], masks, torch.tensor(data["sizes"]), targets)
    replay = ReplayedDraws(draws, cfg.dino.label_noise)
    if "rcnn" in getattr(model, "tags", ()):
        rpn = model.aux_heads[model.tags.index("rcnn")].rpn
        proposals = rpn.proposals
        rpn.proposals = lambda *args, **kwargs: replay.proposals(proposals(*args, **kwargs))
    with replay:
        losses = model.loss(batch)
    assert not replay.unused, replay.unused  # every recorded draw was used
    sum(losses.values()).backward()
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.nn.Parameter)}
    grads = {k: digest(p.grad, probes.state_dict[k]) for k, p in params.items() if p.grad is not None}
    return reference, {k: float(v.detach()) for k, v in losses.items()}, grads, release_groups(weights.sources)


@pytest.fixture(scope="module")
def step(request):
    return training_step(request.param)


@pytest.mark.parametrize("step", list(CONFIGS), indirect=True)
def test_training_parity_loss_terms(step):
    reference, losses, _, _ = step
    names = {c: k for k in reference["losses"] if (c := codetr_loss_name(k)) is not None}
    assert set(names) == set(losses)
    relative = {name: abs(losses[name] - reference["losses"][k]) / abs(reference["losses"][k])
                for name, k in names.items()}
    print(f"largest loss difference: {max(relative.values()):.2e} relative ({max(relative, key=relative.get)})")
    off = {k: v for k, v in relative.items() if v > LOSS_RTOL}
    assert not off, f"loss terms off the release by more than {LOSS_RTOL:g} relative: {off}"




def gradient_differences(reference: dict, grads: dict, groups: list) -> dict[str, float]:
    """Per converter group (named by its first release tensor): the largest of |sum difference|, |probe
    difference| and |difference of the sums of absolute values|, over the release's sum of absolute values."""
    out = {}
    for release_names, codetr_names in groups:
        release_names = [n for n in release_names if n in reference["gradients"]]
        if not release_names:
            continue
        ref = [sum(reference["gradients"][n][i] for n in release_names) for i in range(3)]
        ours = [sum(grads[n][i] for n in codetr_names if n in grads) for i in range(3)]
        out[release_names[0]] = max(abs(ours[i] - ref[i]) for i in range(3)) / max(ref[1], 1e-30)
    return out


@pytest.mark.parametrize("step", list(CONFIGS), indirect=True)
def test_training_parity_gradients(step):
    reference, _, grads, groups = step
    differences = gradient_differences(reference, grads, groups)
    assert set(reference["gradients"]) <= {n for names, _ in groups for n in names}  # every release gradient
    assert set(grads) <= {n for _, names in groups for n in names}  # and every codetr gradient is compared
    print(f"largest gradient difference: {max(differences.values()):.2e} ({max(differences, key=differences.get)})")
    tolerance = {k: next((t for p, t in GRAD_RTOL_FLOAT32.items() if k.startswith(p)), GRAD_RTOL) for k in differences}
    off = {k: v for k, v in differences.items() if v > tolerance[k]}
    assert not off, f"gradients off the release by more than their tolerance ({GRAD_RTOL:g}): {off}"
