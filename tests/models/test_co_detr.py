"""Co-Deformable-DETR: every loss term, gradients from the auxiliary heads into the encoder,
inference identical to the plain model, inference weights without auxiliary parts, repeated
auxiliary heads, weights shared with the plain model under the same names."""

import dataclasses

import pytest
import torch

from codetr.config_parsing import load_config
from codetr.models.build import build_model
from codetr.models.co_detr import CoDETR
from codetr.models.deformable_detr import DeformableDETR
from codetr.structures import Batch, Target


def tiny(name="co_deformable_detr_tiny", **co):
    cfg = load_config(name).model
    cfg.transformer = dataclasses.replace(cfg.transformer, enc_layers=1, dec_layers=2, num_queries=20)
    cfg.co = dataclasses.replace(cfg.co, **co)
    return cfg


def batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 128, 128, generator=g)
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[1, 96:] = True
    targets = [Target(torch.tensor([[10.0, 12, 60, 70], [70, 20, 120, 100]]), torch.tensor([0, 2])),
               Target(torch.tensor([[20.0, 30, 50, 80]]), torch.tensor([5]))]
    return Batch(images, masks, torch.tensor([[128, 128], [96, 128]]), targets)


def test_training_step_has_every_loss_term():
    torch.manual_seed(0)
    model = build_model(tiny())
    assert isinstance(model, CoDETR) and isinstance(model.detector, DeformableDETR)
    losses = model.loss(batch())
    expected = {"loss_cls", "d0.loss_giou", "enc.loss_bbox", "atss.loss_cls", "atss.loss_bbox",
                "atss.loss_centerness", "rpn.loss_cls", "rpn.loss_bbox", "rcnn.loss_cls", "rcnn.loss_bbox"}
    for head in ("rcnn", "atss"):
        expected |= {f"loss_cls_pos_{head}", f"loss_bbox_pos_{head}", f"loss_giou_pos_{head}",
                     f"d0.loss_cls_pos_{head}"}
    assert expected <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_auxiliary_losses_reach_encoder_and_backbone():
    torch.manual_seed(0)
    model = build_model(tiny())
    losses = model.loss(batch())
    aux = sum(v for k, v in losses.items() if k.startswith(("atss.", "rpn.", "rcnn.")))
    aux.backward()
    params = dict(model.named_parameters())
    for name in ("detector.encoder.layers.0.self_attn.value_proj.weight", "detector.backbone.layer4.0.conv1.weight",
                 "adapter.downsample.0.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert params["detector.decoder_layers.0.norm1.weight"].grad is None  # the decoder is not on this path


def test_positive_query_losses_train_the_shared_decoder_and_query_embedding():
    torch.manual_seed(0)
    model = build_model(tiny())
    losses = model.loss(batch())
    sum(v for k, v in losses.items() if "_pos_" in k).backward()
    params = dict(model.named_parameters())
    for name in ("detector.decoder_layers.1.cross_attn.value_proj.weight", "detector.class_branches.0.weight",
                 "positive_queries.box_proj.0.weight", "positive_queries.feat_proj.1.weight",
                 "detector.encoder.layers.0.ffn.0.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


def test_lambdas_scale_their_terms():
    base = {}
    for lambda1, lambda2 in ((1.0, 2.0), (0.5, 1.0)):
        torch.manual_seed(0)
        model = build_model(tiny(lambda1=lambda1, lambda2=lambda2))
        torch.manual_seed(1)
        base[(lambda1, lambda2)] = model.loss(batch())
    a, b = base[(1.0, 2.0)], base[(0.5, 1.0)]
    for k in a:
        factor = 0.5 if ("_pos_" in k or k.startswith(("atss.", "rpn.", "rcnn."))) else 1.0
        torch.testing.assert_close(b[k], a[k] * factor, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("co", [dict(aux_heads=["atss"]), dict(positive_queries=False), dict(zero_padding=True)])
def test_ablation_switches(co):
    torch.manual_seed(0)
    losses = build_model(tiny(**co)).loss(batch())
    has_pos = any("_pos_" in k for k in losses)
    assert has_pos == co.get("positive_queries", True)
    assert any(k.startswith("rcnn.") for k in losses) == ("rcnn" in co.get("aux_heads", ["rcnn"]))
    assert all(torch.isfinite(v) for v in losses.values())


def test_eval_output_equals_the_plain_model_and_aux_parts_do_not_run():
    torch.manual_seed(0)
    co = build_model(tiny()).eval()
    plain = DeformableDETR(tiny("deformable_detr_tiny")).eval()
    weights = co.inference_state_dict()
    assert not any(k.startswith(("aux_heads.", "adapter.", "positive_queries.")) for k in weights)
    plain.load_state_dict(weights, strict=True)
    calls = []
    for module in (co.aux_heads, co.adapter, co.positive_queries):
        module.register_forward_pre_hook(lambda *args: calls.append(1))
        for sub in module.modules():
            sub.register_forward_pre_hook(lambda *args: calls.append(1))
    b = batch()
    ours, theirs = co.predict(b), plain.predict(b)
    assert not calls
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x.boxes, y.boxes)
        torch.testing.assert_close(x.scores, y.scores)
        assert torch.equal(x.labels, y.labels)


@pytest.mark.parametrize("head", ["atss", "rcnn"])
def test_eval_head_evaluates_an_auxiliary_head(head):
    torch.manual_seed(0)
    model = build_model(tiny(eval_head=head)).eval()
    dets = model.predict(batch())
    assert len(dets) == 2 and all(len(d.scores) <= 100 for d in dets)
    index = ["rcnn", "atss"].index(head)
    assert any(k.startswith(f"aux_heads.{index}.") for k in model.inference_state_dict())


def test_repeated_auxiliary_heads_have_their_own_weights_and_losses():
    torch.manual_seed(0)
    model = build_model(tiny(aux_heads=["atss", "atss", "rcnn"]))
    assert len(model.aux_heads) == 3 and model.aux_heads[0] is not model.aux_heads[1]
    assert len(model.positive_queries.box_proj) == 3
    losses = model.loss(batch())
    for tag in ("atss0", "atss1"):
        assert {f"{tag}.loss_cls", f"{tag}.loss_bbox", f"loss_cls_pos_{tag}"} <= set(losses), tag
    assert {"rpn.loss_cls", "loss_cls_pos_rcnn"} <= set(losses)  # a single head keeps its plain names
    assert not torch.equal(losses["atss0.loss_cls"], losses["atss1.loss_cls"])  # separate weights
    sum(v for k, v in losses.items() if k.startswith("atss1.")).backward()
    assert model.aux_heads[1].atss_cls.weight.grad is not None and model.aux_heads[0].atss_cls.weight.grad is None
    with pytest.raises(ValueError, match="ambiguous"):
        build_model(tiny(aux_heads=["atss", "atss"], eval_head="atss"))


def test_state_dict_keeps_the_plain_names_and_round_trips():
    torch.manual_seed(0)
    co = build_model(tiny())
    plain = DeformableDETR(tiny("deformable_detr_tiny"))
    state = co.state_dict()
    assert set(plain.state_dict()) <= set(state)  # base weights under their own names
    assert not any(k.startswith("detector.") for k in state)
    assert all(k in plain.state_dict() or k.startswith(("adapter.", "aux_heads.", "positive_queries."))
               for k in state)
    torch.manual_seed(1)
    other = build_model(tiny())
    other.load_state_dict(state, strict=True)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())
    # plain weights into the Co- model: only the training-only parts are reported missing
    missing, unexpected = other.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("adapter.", "aux_heads.", "positive_queries."))
                                              for k in missing)
    assert torch.equal(other.detector.class_branches[0].weight, plain.class_branches[0].weight)
