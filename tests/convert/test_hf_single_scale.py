"""Numerical parity with transformers' ConditionalDetrForObjectDetection and DabDetrForObjectDetection
(random init, no downloads): converted weights give the same logits and boxes, and the same
training losses."""

import pytest
import torch
from torchvision.ops import box_convert

transformers = pytest.importorskip("transformers")

from codetr.convert.hf_single_scale import (  # noqa: E402
    CONDITIONAL_RULES,
    DAB_RULES,
    conditional_config_from_hf,
    convert_hf_single_scale,
    dab_config_from_hf,
)
from codetr.models.build import build_model  # noqa: E402
from codetr.structures import Batch, Target  # noqa: E402

SIZES = dict(encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=96, decoder_ffn_dim=96, num_queries=20, num_labels=5, dropout=0.0)
FAMILIES = {
    "conditional_detr": (lambda: transformers.ConditionalDetrForObjectDetection(transformers.ConditionalDetrConfig(
        backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=False, d_model=64, **SIZES)),
        conditional_config_from_hf, CONDITIONAL_RULES),
    "dab_detr": (lambda: transformers.DabDetrForObjectDetection(transformers.DabDetrConfig(
        backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=False, hidden_size=64, **SIZES)),
        dab_config_from_hf, DAB_RULES),
}


def hf_model(family: str):
    torch.manual_seed(0)
    model = FAMILIES[family][0]().eval()
    with torch.no_grad():  # random, non-trivial values everywhere (init leaves zeros and ones)
        for name, p in model.named_parameters():
            if "backbone" not in name:
                p.add_(torch.randn_like(p) * 0.05)
        if family == "dab_detr":  # the decoder's copy of the box head is tied to the head's
            model.model.decoder.bbox_embed.load_state_dict(model.bbox_predictor.state_dict())
    return model


def converted(family: str):
    hf = hf_model(family)
    cfg = FAMILIES[family][1](hf.config.to_dict())
    ours = build_model(cfg).eval()
    ours.load_state_dict(convert_hf_single_scale(hf.state_dict(), FAMILIES[family][2]), strict=True)
    return hf, ours


def inputs():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 160, 192)
    pixel_mask = torch.ones(2, 160, 192, dtype=torch.long)
    pixel_mask[1, 96:, :] = 0  # the second image is 96 x 128, padded
    pixel_mask[1, :, 128:] = 0
    images[1, :, 96:] = 0
    images[1, :, :, 128:] = 0
    return images, pixel_mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_boxes_match_transformers(family):
    hf, ours = converted(family)
    images, pixel_mask = inputs()
    with torch.no_grad():
        theirs = hf(pixel_values=images, pixel_mask=pixel_mask)
        out, _ = ours(images, pixel_mask == 0)
    assert out.logits.shape[0] == 3
    torch.testing.assert_close(out.logits[-1], theirs.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.boxes[-1], theirs.pred_boxes, atol=1e-5, rtol=1e-5)
    # the parity is not vacuous: box centres vary over queries (100x the tolerance), and the padded
    # image's predictions depend on the mask
    assert out.boxes[-1][..., :2].std(1).min() > 1e-3
    with torch.no_grad():
        unmasked, _ = ours(images, torch.zeros(2, 160, 192, dtype=torch.bool))
    assert not torch.allclose(unmasked.logits[-1][1], out.logits[-1][1], atol=1e-3)


def test_dab_detr_every_layer_matches_transformers():
    """DAB-DETR's intermediate layers (their anchors are the previous layers' boxes) against
    transformers' auxiliary outputs (the decoder's LayerNorm on every layer, as codetr's heads)."""
    hf, ours = converted("dab_detr")
    hf.config.auxiliary_loss = True
    images, pixel_mask = inputs()
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    with torch.no_grad():
        theirs = hf(pixel_values=images, pixel_mask=pixel_mask, labels=labels)
        out, _ = ours(images, pixel_mask == 0)
    for layer, aux in enumerate(theirs.auxiliary_outputs):
        torch.testing.assert_close(out.logits[layer], aux["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.boxes[layer], aux["pred_boxes"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_losses_match_transformers(family):
    """The one-to-one losses of every decoder layer, unweighted, against transformers' own (its
    Deformable-DETR loss for both families: focal classification, L1 and GIoU on Hungarian matches
    with the configured costs, normalised by the number of boxes), on the padded batch with three
    objects in one image and one in the other. Boxes go to transformers normalised by each
    unpadded image's size, to codetr in its pixels. Conditional DETR: the last layer only, because
    transformers' ``auxiliary_loss=True`` changes its decoder (docs/single-scale.md)."""
    hf, ours = converted(family)
    hf.config.auxiliary_loss = family == "dab_detr"
    images, pixel_mask = inputs()
    sizes = torch.tensor([[160, 192], [96, 128]])
    boxes = [torch.tensor([[10.0, 20.0, 90.0, 100.0], [100.0, 30.0, 180.0, 150.0], [40.0, 60.0, 70.0, 80.0]]),
             torch.tensor([[5.0, 5.0, 60.0, 90.0]])]
    labels = [torch.tensor([1, 3, 0]), torch.tensor([4])]
    hf_labels = [{"class_labels": lab, "boxes": box_convert(box, "xyxy", "cxcywh") / torch.tensor([w, h, w, h])}
                 for (h, w), box, lab in zip(sizes.tolist(), boxes, labels)]
    with torch.no_grad():
        theirs = hf(pixel_values=images, pixel_mask=pixel_mask, labels=hf_labels).loss_dict
        ours_terms = ours.loss(Batch(images, pixel_mask == 0, sizes, [Target(b, lab) for b, lab in zip(boxes, labels)]))
    weights = ours.cfg.loss
    layers = ours.cfg.transformer.dec_layers
    compared = range(layers) if hf.config.auxiliary_loss else [layers - 1]
    for layer in compared:
        last = layer == layers - 1
        prefix, suffix = ("", "") if last else (f"d{layer}.", f"_{layer}")
        for name, hf_name, weight in (("loss_cls", "loss_ce", weights.cls_weight),
                                      ("loss_bbox", "loss_bbox", weights.l1_weight),
                                      ("loss_giou", "loss_giou", weights.giou_weight)):
            torch.testing.assert_close(ours_terms[prefix + name] / weight, theirs[hf_name + suffix],
                                       rtol=1e-5, atol=1e-6, msg=f"{prefix}{name} ({family})")
    assert len(theirs) == 4 * len(compared)  # (with transformers' cardinality_error): every layer's terms compared


def test_conditional_detr_transformers_4_names():
    """The names of transformers 4.x files (the hub's microsoft/conditional-detr-resnet-50) convert alike."""
    hf = hf_model("conditional_detr")
    state = hf.state_dict()
    renames = [("backbone.model.", "backbone.conv_encoder.model."), ("self_attn.q_content_proj", "sa_qcontent_proj"),
               ("self_attn.k_pos_proj", "sa_kpos_proj"), ("self_attn.v_proj", "sa_v_proj"),
               ("encoder_attn.q_pos_sine_proj", "ca_qpos_sine_proj"), ("encoder_attn.q_pos_proj", "ca_qpos_proj"),
               ("encoder_attn.o_proj", "encoder_attn.out_proj"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")]
    old = {}
    for name, value in state.items():
        for new_part, old_part in renames:
            if not name.startswith("model.encoder.") or new_part in ("mlp.fc1", "mlp.fc2"):
                name = name.replace(new_part, old_part)
        old[name] = value
    assert any("sa_qcontent_proj" in k for k in old) and any(k.startswith("model.backbone.conv_encoder.") for k in old)
    new = convert_hf_single_scale(state, CONDITIONAL_RULES)
    assert convert_hf_single_scale(old, CONDITIONAL_RULES).keys() == new.keys()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unknown_parameter_is_named(family):
    state = dict(hf_model(family).state_dict())
    state["model.surprise.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="model.surprise.weight"):
        convert_hf_single_scale(state, FAMILIES[family][2])


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cli_converts_a_saved_transformers_folder(family, tmp_path):
    """``codetr convert hf-...`` on a ``save_pretrained`` folder: weights and config.yaml that
    ``codetr predict``'s loading path builds, giving transformers' outputs."""
    from codetr.cli import main
    from codetr.config_parsing import load_config
    from codetr.inference.weights import read_safetensors

    hf = hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    dst = tmp_path / "out" / "model.safetensors"
    assert main(["convert", f"hf-{family.replace('_', '-')}", str(tmp_path / "hf"), str(dst)]) == 0
    cfg = load_config(tmp_path / "out" / "config.yaml")
    assert cfg.model.arch == family and cfg.model.num_classes == 5
    ours = build_model(cfg.model).eval()
    ours.load_state_dict(read_safetensors(dst)[0], strict=True)
    images, pixel_mask = inputs()
    with torch.no_grad():
        theirs = hf(pixel_values=images, pixel_mask=pixel_mask)
        out, _ = ours(images, pixel_mask == 0)
    torch.testing.assert_close(out.boxes[-1], theirs.pred_boxes, atol=1e-5, rtol=1e-5)
