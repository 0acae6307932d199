"""Numerical parity with transformers' DeformableDetrForObjectDetection (random init, no downloads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from codetr.convert.hf_deformable_detr import config_from_hf, convert_hf_deformable_detr  # noqa: E402
from codetr.models.deformable_detr import DeformableDETR  # noqa: E402


def hf_model(two_stage: bool):
    torch.manual_seed(0)
    config = transformers.DeformableDetrConfig(
        backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=False,
        d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_n_points=2, decoder_n_points=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        num_queries=30, two_stage_num_proposals=30, two_stage=two_stage, with_box_refine=True,
        num_labels=5, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    model = transformers.DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():  # random, non-trivial values everywhere (init leaves many zeros)
        for name, p in model.named_parameters():
            if "backbone" not in name:
                p.add_(torch.randn_like(p) * 0.02)
    return model, config


@pytest.mark.parametrize("two_stage", [True, False])
def test_logits_and_boxes_match_transformers(two_stage):
    hf, hf_config = hf_model(two_stage)
    cfg = config_from_hf(hf_config.to_dict())
    ours = DeformableDETR(cfg).eval()
    ours.load_state_dict(convert_hf_deformable_detr(hf.state_dict()), strict=True)

    torch.manual_seed(1)
    images = torch.randn(2, 3, 160, 192)
    pixel_mask = torch.ones(2, 160, 192, dtype=torch.long)
    pixel_mask[1, 120:, :] = 0  # second image is 120 x 150, padded
    pixel_mask[1, :, 150:] = 0
    images[1, :, 120:] = 0
    images[1, :, :, 150:] = 0
    with torch.no_grad():
        theirs = hf(pixel_values=images, pixel_mask=pixel_mask)
        out, _ = ours(images, pixel_mask == 0)
    torch.testing.assert_close(out.logits[-1], theirs.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.boxes[-1], theirs.pred_boxes, atol=1e-4, rtol=1e-4)
    if two_stage:
        torch.testing.assert_close(out.enc_logits, theirs.enc_outputs_class, atol=1e-4, rtol=1e-4)
    # the parity is not vacuous: the padded image's predictions depend on the mask
    with torch.no_grad():
        unmasked, _ = ours(images, torch.zeros(2, 160, 192, dtype=torch.bool))
    assert not torch.allclose(unmasked.logits[-1][1], out.logits[-1][1], atol=1e-3)


def test_unknown_parameter_is_named():
    hf, _ = hf_model(True)
    state = dict(hf.state_dict())
    state["model.surprise.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="model.surprise.weight"):
        convert_hf_deformable_detr(state)


def test_file_with_only_the_decoder_copies_of_the_branches():
    """transformers 5 ``save_pretrained`` keeps one of the tied copies: ``model.decoder.*_embed``."""
    hf, hf_config = hf_model(True)
    full = convert_hf_deformable_detr(hf.state_dict())
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith(("class_embed.", "bbox_embed."))}
    assert any(k.startswith("model.decoder.class_embed.") for k in state)
    converted = convert_hf_deformable_detr(state)
    assert converted.keys() == full.keys()
    assert all(torch.equal(converted[k], full[k]) for k in full)
