"""Deformable-DETR model: shapes, padding masks, look-forward-twice, gradients, prediction."""

import dataclasses

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from codetr.config_parsing import load_config
from codetr.models.backbones.resnet import ResNetBackbone
from codetr.models.deformable_detr import DeformableDETR
from codetr.structures import Batch, Target


def tiny_cfg(**transformer):
    cfg = load_config("deformable_detr_tiny").model
    cfg.transformer = dataclasses.replace(cfg.transformer, enc_layers=1, dec_layers=2, num_queries=20, **transformer)
    return cfg


def make_batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 128, 160, generator=g)
    masks = torch.zeros(2, 128, 160, dtype=torch.bool)
    masks[1, 96:] = True
    masks[1, :, 128:] = True
    images[1][:, masks[1]] = 0
    targets = [Target(torch.tensor([[10.0, 20, 60, 90], [70, 30, 150, 100]]), torch.tensor([0, 3])),
               Target(torch.tensor([[5.0, 5, 40, 50]]), torch.tensor([5]))]
    return Batch(images, masks, torch.tensor([[128, 160], [96, 128]]), targets)


def test_output_shapes():
    torch.manual_seed(0)
    model = DeformableDETR(tiny_cfg()).eval()
    out, enc = model(make_batch().images, make_batch().masks)
    assert out.logits.shape == (2, 2, 20, 6) and out.boxes.shape == (2, 2, 20, 4)
    assert enc.memory.shape[1] == out.enc_logits.shape[1] == sum(h * w for h, w in enc.spatial_shapes)
    assert enc.spatial_shapes == [(16, 20), (8, 10), (4, 5), (2, 3)]
    assert torch.all((out.boxes >= 0) & (out.boxes <= 1))


def test_group_norm_backbone_normalises_what_frozen_batch_norm_leaves_raw():
    """Trained from scratch, frozen batch norm is the identity: the ResNet is positively homogeneous
    (C3-C5 scale with the image). The group-norm variant has a trained norm after every conv
    in its place, so its features do not depend on the image's scale."""
    torch.manual_seed(0)
    image = torch.randn(1, 3, 64, 96)
    raw = ResNetBackbone("resnet18", None, -1, "frozen_bn").eval()
    normed = ResNetBackbone("resnet18", None, -1, "group_norm").eval()
    with torch.no_grad():
        for small, large in zip(raw(image), raw(10 * image)):
            torch.testing.assert_close(large, 10 * small, rtol=1e-4, atol=1e-4)
        for small, large in zip(normed(image), normed(10 * image)):
            torch.testing.assert_close(large, small, rtol=1e-3, atol=1e-3)
    frozen = [m for m in raw.modules() if isinstance(m, FrozenBatchNorm2d)]
    groups = [m for m in normed.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(groups) == len(frozen) > 0 and all(m.num_groups == 32 for m in groups)
    assert all(p.requires_grad for m in groups for p in m.parameters())
    with pytest.raises(ValueError, match="batch_norm"):
        ResNetBackbone("resnet18", None, -1, "batch_norm")


def test_images_in_a_batch_do_not_interact():
    """Each image's predictions are the same alone as in a batch (catches batch/head mixing in reshapes)."""
    torch.manual_seed(0)
    model = DeformableDETR(tiny_cfg()).eval()
    batch = make_batch()
    together, _ = model(batch.images, batch.masks)
    for i in range(2):
        alone, _ = model(batch.images[i:i + 1], batch.masks[i:i + 1])
        torch.testing.assert_close(alone.logits[:, 0], together.logits[:, i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(alone.boxes[:, 0], together.boxes[:, i], atol=1e-4, rtol=1e-4)


def test_look_forward_twice_changes_gradients_not_values():
    batch = make_batch()
    grads, outs = [], []
    for lft in (False, True):
        torch.manual_seed(0)
        model = DeformableDETR(tiny_cfg(look_forward_twice=lft))
        with torch.no_grad():  # non-zero box deltas so layers interact
            for branch in model.box_branches:
                branch[-1].weight.normal_(std=0.1)
        out, _ = model(batch.images, batch.masks)
        outs.append(out.boxes.detach())
        out.boxes[-1].sum().backward()
        grads.append(model.box_branches[0][-1].weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1])
    assert grads[0].abs().sum() == 0  # without LFT, the last layer's boxes do not reach layer 0
    assert grads[1].abs().sum() > 0


def test_loss_backward_reaches_every_stage():
    torch.manual_seed(0)
    model = DeformableDETR(tiny_cfg())
    losses = model.loss(make_batch())
    assert {"loss_cls", "loss_bbox", "loss_giou", "d0.loss_cls", "enc.loss_cls"} <= set(losses)
    sum(losses.values()).backward()
    for name in ("backbone.layer4.0.conv1.weight", "neck.convs.0.0.weight",
                 "encoder.layers.0.self_attn.value_proj.weight", "decoder_layers.1.cross_attn.value_proj.weight",
                 "class_branches.1.weight", "pos_trans.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


@pytest.mark.parametrize("two_stage", [True, False])
def test_predict_returns_sorted_boxes_inside_the_image(two_stage):
    torch.manual_seed(0)
    model = DeformableDETR(tiny_cfg(two_stage=two_stage, mixed_selection=two_stage)).eval()
    batch = make_batch()
    dets = model.predict(batch)
    for det, (h, w) in zip(dets, batch.image_sizes.tolist()):
        assert len(det.scores) == model.cfg.max_detections
        assert torch.all(det.scores[:-1] >= det.scores[1:])
        assert torch.all(det.boxes[:, 0::2] >= -1e-4) and torch.all(det.boxes[:, 0::2] <= w + 1e-4)
        assert torch.all(det.boxes[:, 1::2] >= -1e-4) and torch.all(det.boxes[:, 1::2] <= h + 1e-4)
        assert torch.all((det.labels >= 0) & (det.labels < 6))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("config", ["deformable_detr_tiny", "co_dino_tiny"])
def test_transformer_activation_checkpointing_recomputes_and_keeps_loss_and_gradients(config):
    """enc_with_cp=1 of 2 encoder layers, dec_with_cp=2 of 3 decoder layers, dropout on, float64:
    the same losses and gradients; the checkpointed layers run again in the backward pass (Co-DINO
    also runs the decoder for its positive queries), the others do not."""
    from codetr.models.build import build_model

    results = []
    for enc_cp, dec_cp in ((0, 0), (1, 2)):
        cfg = load_config(config).model
        cfg.transformer = dataclasses.replace(cfg.transformer, enc_layers=2, dec_layers=3, dropout=0.1,
                                              enc_with_cp=enc_cp, dec_with_cp=dec_cp)
        torch.manual_seed(0)
        model = build_model(cfg).double()
        base = getattr(model, "detector", model)
        layers = [*base.encoder.layers, *base.decoder_layers]
        calls = [0] * len(layers)
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        batch = make_batch()  # at half size
        batch = Batch(batch.images[:, :, ::2, ::2].double(), batch.masks[:, ::2, ::2], batch.image_sizes // 2,
                      [Target(t.boxes.double() / 2, t.labels) for t in batch.targets])
        torch.manual_seed(1)
        losses = model.loss(batch)
        forward_calls = list(calls)
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, forward_calls,
                        [c - f for c, f in zip(calls, forward_calls)]))
    (plain, plain_grads, plain_calls, plain_again), (cp, cp_grads, cp_calls, cp_again) = results
    assert plain.keys() == cp.keys()
    for key in plain:
        torch.testing.assert_close(cp[key], plain[key], rtol=1e-10, atol=1e-12)
    assert plain_grads.keys() == cp_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(cp_grads[name], plain_grads[name], rtol=1e-9, atol=1e-12)
    assert cp_calls == plain_calls and plain_again == [0] * 5
    # encoder 0 and decoder 0, 1 run once more per forward call; encoder 1 and decoder 2 do not
    assert cp_again == [plain_calls[0], 0, plain_calls[2], plain_calls[3], 0]


def test_transformer_activation_checkpointing_must_name_a_number_of_layers():
    with pytest.raises(ValueError, match="enc_with_cp must be a number of layers .0 or more., got -1"):
        DeformableDETR(tiny_cfg(enc_with_cp=-1))
    with pytest.raises(ValueError, match="dec_with_cp"):
        DeformableDETR(tiny_cfg(dec_with_cp=True))
    DeformableDETR(tiny_cfg(enc_with_cp=6, dec_with_cp=6))  # more than the layers: all of them
