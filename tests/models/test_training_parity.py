"""One training step of codetr against the released Co-DETR (Sense-X/Co-DETR) on the same weights and batch.

``bench/release_reference/record.py`` ran the release on the batch of ``tests/release_parity.py`` with weights
that are a function of each release parameter's name, and stored every loss term, a digest of every parameter
gradient and every random draw (tests/data/release_parity/). Here codetr converts the same release-format
weights with its checkpoint converter, replays the release's draws (denoising noise, RPN / RoI samplers,
positive-query padding), runs its training step and compares. See docs/co-detr.md, "Parity with the release".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from codetr.config_parsing import load_config
from codetr.convert.mmdet import convert_checkpoint
from codetr.models.build import build_model
from codetr.structures import Batch, Target
from release_parity import DATA_DIR, digest, parity_batch, release_probe, release_tensor

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
DATA = Path(__file__).parents[2] / DATA_DIR
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
AUX_HEADS = {"0": "rcnn", "1": "atss"}  # the release numbers its auxiliary heads in config order
# Differences measured and not yet explained (docs/co-detr.md): each test below xfails strictly, so that a fix
# (or a new difference) shows up.
OPEN = {
    # the main decoder pass (matching + denoising queries): 1e-5 to 1e-3 relative from the first layer on,
    # while the encoder losses and the ATSS positive-query pass through the same decoder agree to 1e-7; its
    # matching queries come out in another order (the same boxes at other indices)
    "decoder": re.compile(r"^(d\d\.)?(dn\.)?loss_(cls|bbox|giou)$"),
    # the RoI samples: the RPN proposals are the same set, but a few pairs with equal scores come in the
    # other order, so the replayed sampler permutation picks a few other negatives: the RoI classification
    # loss (1e-5) and the Faster R-CNN positive-query pass (0.1 % to 30 %)
    "rcnn samples": re.compile(r"_pos_rcnn$|^rcnn\.loss_cls$"),
}


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
    """Patches torch.rand / randint / randperm for the duration of codetr's step so that each returns the
    release's recorded draw: the denoising noise in the release's order (label flips, flipped labels, box signs,
    box factors; the release draws a new label only where a label flips), and each sampler permutation by its
    length (a permutation the release did not draw, because its sampler kept the whole pool, is the identity:
    the same subset)."""

    def __init__(self, draws: list[dict], label_noise: float):
        self.denoising = [d for d in draws if "query_denoising" in d["where"]]
        self.permutations = [d for d in draws if d["function"] == "randperm"]
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

    def __enter__(self) -> ReplayedDraws:
        self.saved = torch.rand, torch.randint, torch.randperm
        torch.rand, torch.randint, torch.randperm = self.rand, self.randint, self.randperm
        return self

    def __exit__(self, *exc) -> None:
        torch.rand, torch.randint, torch.randperm = self.saved


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


@pytest.fixture(scope="module")
def step(request):
    name = request.param
    reference = json.loads((DATA / f"{name}.json").read_text())
    draws = torch.load(DATA / f"{name}_draws.pt", weights_only=True)
    cfg = load_config("co_dino_5scale_lsj_r50_1x_coco", ["model.num_classes=3", "model.backbone.weights=null"]).model
    shapes = {k: tuple(s) for k, s in reference["state_dict"].items()}
    weights = convert_checkpoint({k: release_tensor(k, s) for k, s in shapes.items()}, cfg, keep_aux=True)
    assert weights.ok, (weights.missing, weights.unused, weights.unexpected, weights.problems)
    params = set(reference["gradients"])
    probes = convert_checkpoint({k: release_probe(k, s) if k in params else release_tensor(k, s)
                                 for k, s in shapes.items()}, cfg, keep_aux=True)
    model = build_model(cfg).train()
    model.load_state_dict(weights.state_dict)
    data = parity_batch()
    targets = [Target(b[~c], lab[~c]) for b, lab, c in zip(data["boxes"], data["labels"], data["crowd"])]
    h, w = data["images"].shape[-2:]
    batch = Batch(data["images"], torch.zeros(len(targets), h, w, dtype=torch.bool), torch.tensor([[h, w]] * 3), targets)
    with ReplayedDraws(draws, cfg.dino.label_noise) as replay:
        losses = model.loss(batch)
    assert not replay.denoising and not replay.permutations  # every recorded draw was used
    sum(losses.values()).backward()
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.nn.Parameter)}
    grads = {k: digest(p.grad, probes.state_dict[k]) for k, p in params.items() if p.grad is not None}
    return reference, {k: float(v.detach()) for k, v in losses.items()}, grads, release_groups(weights.sources)


# parameters that only the auxiliary heads' own losses reach (the RPN, the RoI head, the ATSS head)
GRADIENT_CLOSED = ("rpn_head.", "roi_head.", "bbox_head.")


def open_difference(codetr_name: str) -> str | None:
    return next((why for why, pattern in OPEN.items() if pattern.search(codetr_name)), None)


@pytest.mark.parametrize("step", ["co_dino_r50_lsj"], indirect=True)
def test_training_parity_loss_terms(step, request):
    reference, losses, _, _ = step
    names = {c: k for k in reference["losses"] if (c := codetr_loss_name(k)) is not None}
    assert set(names) == set(losses)
    failures = {}
    for name, release_name in names.items():
        expected = reference["losses"][release_name]
        relative = abs(losses[name] - expected) / abs(expected)
        if relative > LOSS_RTOL:
            failures[name] = relative
    closed = {k: v for k, v in failures.items() if open_difference(k) is None}
    assert not closed, f"loss terms off the release by more than {LOSS_RTOL:g} relative: {closed}"
    still_open = {why for why in map(open_difference, failures) if why}
    assert still_open == set(OPEN), f"documented differences that no longer show: {set(OPEN) - still_open}"


def gradient_differences(reference: dict, grads: dict, groups: list) -> dict[str, float]:
    """Per converter group (named by its first release tensor): the largest of |sum difference| and |probe
    difference| over the release's sum of absolute values, and the relative difference of that sum."""
    out = {}
    for release_names, codetr_names in groups:
        release_names = [n for n in release_names if n in reference["gradients"]]
        if not release_names:
            continue
        ref = [sum(reference["gradients"][n][i] for n in release_names) for i in range(3)]
        ours = [sum(grads[n][i] for n in codetr_names if n in grads) for i in range(3)]
        scale = max(ref[1], 1e-30)
        out[release_names[0]] = max(abs(ours[0] - ref[0]) / scale, abs(ours[1] - ref[1]) / scale,
                                    abs(ours[2] - ref[2]) / scale)
    return out


@pytest.mark.parametrize("step", ["co_dino_r50_lsj"], indirect=True)
def test_training_parity_gradients(step):
    reference, _, grads, groups = step
    differences = gradient_differences(reference, grads, groups)
    assert set(reference["gradients"]) <= {n for names, _ in groups for n in names}  # every release gradient
    assert set(grads) <= {n for _, names in groups for n in names}  # and every codetr gradient is compared
    off = {k for k, v in differences.items() if v > GRAD_RTOL}
    # the auxiliary heads' own layers see none of the open loss differences: they must agree
    heads = {k for k in differences if k.startswith(GRADIENT_CLOSED)}
    assert len(heads) > 20 and not off & heads, {k: differences[k] for k in off & heads}
    # the rest reaches the decoder's open differences (OPEN) through the shared trunk; once those are fixed,
    # tighten this test to every gradient
    assert off, "every gradient agrees now: drop the open differences of this test"
