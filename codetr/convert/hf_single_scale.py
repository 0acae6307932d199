"""Convert transformers' ``ConditionalDetrForObjectDetection`` and ``DabDetrForObjectDetection`` weights to
codetr's Conditional DETR and DAB-DETR (``codetr convert hf-conditional-detr`` / ``hf-dab-detr``).

Works on the state_dict alone (transformers is not needed); Conditional DETR's parameter names of
transformers 4.x (``sa_qcontent_proj``, ``fc1``, ...) and 5.x (``self_attn.q_content_proj``,
``mlp.fc1``, ...) are both understood. The backbone must be timm's ResNet (the transformers default,
``use_timm_backbone=True``), whose names are torchvision's. The encoder's q/k/v projections are packed
into ``in_proj_weight`` / ``in_proj_bias``; the class and box heads, shared by the decoder layers, are
``class_branches.0`` / ``box_branches.0``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from codetr.config import ModelConfig

Rules = list[tuple[str, str]]

# Patterns on the transformers name -> codetr name; "{mlp}" is replaced by twice the named group
# ``mlp`` (an MLP's Linear k sits at Sequential index 2k), "{proj}" by codetr's name of the projection.
_COMMON: Rules = [
    (r"^model\.backbone\.(conv_encoder\.)?model\.(_backbone\.)?(.*)$", r"backbone.\3"),
    (r"^model\.input_projection\.(weight|bias)$", r"input_proj.\1"),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn\.(o_proj|out_proj)\.(weight|bias)$", r"encoder.layers.\1.self_attn.out_proj.\3"),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"encoder.layers.\1.norm1.\2"),
    (r"^model\.encoder\.layers\.(\d+)\.(mlp\.)?fc1\.(weight|bias)$", r"encoder.layers.\1.ffn.0.\3"),
    (r"^model\.encoder\.layers\.(\d+)\.activation_fn\.weight$", r"encoder.layers.\1.ffn.1.weight"),
    (r"^model\.encoder\.layers\.(\d+)\.(mlp\.)?fc2\.(weight|bias)$", r"encoder.layers.\1.ffn.3.\3"),
    (r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"encoder.layers.\1.norm2.\2"),
    (r"^model\.decoder\.layernorm\.(weight|bias)$", r"decoder_norm.\1"),
    (r"^model\.decoder\.(query_scale|ref_point_head|ref_anchor_head)\.layers\.(?P<mlp>\d)\.(weight|bias)$",
     r"\1.{mlp}.\3"),
    (r"^bbox_predictor\.layers\.(?P<mlp>\d)\.(weight|bias)$", r"box_branches.0.{mlp}.\2"),
]
_PROJECTIONS = {"qcontent": "q_content", "qpos": "q_pos", "kcontent": "k_content", "kpos": "k_pos", "v": "value",
                "qpos_sine": "q_spatial", "query_content": "q_content", "query_pos": "q_pos", "key_content": "k_content",
                "key_pos": "k_pos", "value": "value", "query_pos_sine": "q_spatial"}
CONDITIONAL_RULES: Rules = _COMMON + [
    (r"^model\.query_position_embeddings\.weight$", "query_embedding.weight"),
    # 5.x: self_attn.q_content_proj / encoder_attn.q_pos_sine_proj; 4.x: sa_qcontent_proj / ca_qpos_sine_proj
    (r"^model\.decoder\.layers\.(\d+)\.(self_attn\.|sa_)(?P<proj>q_?content|q_?pos|k_?content|k_?pos|v)_proj\.(.*)$",
     r"decoder_layers.\1.self_attn.{proj}.\4"),
    (r"^model\.decoder\.layers\.(\d+)\.(encoder_attn\.|ca_)(?P<proj>q_?content|q_?pos_sine|q_?pos|k_?content|k_?pos|v)"
     r"_proj\.(.*)$", r"decoder_layers.\1.cross_attn.{proj}.\4"),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.(o_proj|out_proj)\.(.*)$", r"decoder_layers.\1.self_attn.out_proj.\3"),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.(o_proj|out_proj)\.(.*)$", r"decoder_layers.\1.cross_attn.out_proj.\3"),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.(.*)$", r"decoder_layers.\1.norm1.\2"),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.(.*)$", r"decoder_layers.\1.norm2.\2"),
    (r"^model\.decoder\.layers\.(\d+)\.(mlp\.)?fc1\.(.*)$", r"decoder_layers.\1.ffn.0.\3"),
    (r"^model\.decoder\.layers\.(\d+)\.(mlp\.)?fc2\.(.*)$", r"decoder_layers.\1.ffn.3.\3"),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.(.*)$", r"decoder_layers.\1.norm3.\2"),
    (r"^class_labels_classifier\.(weight|bias)$", r"class_branches.0.\1"),
]
DAB_RULES: Rules = _COMMON + [
    (r"^model\.query_refpoint_embeddings\.weight$", "query_embedding.weight"),
    (r"^model\.encoder\.query_scale\.layers\.(?P<mlp>\d)\.(weight|bias)$", r"encoder.pos_scale.{mlp}.\2"),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.self_attn_(?P<proj>query_content|query_pos|key_content|key_pos|value)"
     r"_proj\.(.*)$", r"decoder_layers.\1.self_attn.{proj}.\3"),
    (r"^model\.decoder\.layers\.(\d+)\.cross_attn\.cross_attn_(?P<proj>query_content|query_pos_sine|query_pos|"
     r"key_content|key_pos|value)_proj\.(.*)$", r"decoder_layers.\1.cross_attn.{proj}.\3"),
    (r"^model\.decoder\.layers\.(\d+)\.(self|cross)_attn\.(self|cross)_attn\.output_proj\.(.*)$",
     r"decoder_layers.\1.\2_attn.out_proj.\4"),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.self_attn_layer_norm\.(.*)$", r"decoder_layers.\1.norm1.\2"),
    (r"^model\.decoder\.layers\.(\d+)\.cross_attn\.cross_attn_layer_norm\.(.*)$", r"decoder_layers.\1.norm2.\2"),
    (r"^model\.decoder\.layers\.(\d+)\.mlp\.fc1\.(.*)$", r"decoder_layers.\1.ffn.0.\2"),
    (r"^model\.decoder\.layers\.(\d+)\.mlp\.activation_fn\.weight$", r"decoder_layers.\1.ffn.1.weight"),
    (r"^model\.decoder\.layers\.(\d+)\.mlp\.fc2\.(.*)$", r"decoder_layers.\1.ffn.3.\2"),
    (r"^model\.decoder\.layers\.(\d+)\.mlp\.final_layer_norm\.(.*)$", r"decoder_layers.\1.norm3.\2"),
    (r"^class_embed\.(weight|bias)$", r"class_branches.0.\1"),
]
_ENCODER_QKV = re.compile(r"^model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$")
# DAB-DETR's decoder holds a copy of the head's box MLP (tied) for the anchor updates.
_TIED_BOX = "model.decoder.bbox_embed."


def _rename(name: str, rules: Rules) -> str | None:
    for pattern, replacement in rules:
        match = re.match(pattern, name)
        if match is None:
            continue
        new = match.expand(replacement)
        groups = match.groupdict()
        if groups.get("mlp") is not None:
            new = new.replace("{mlp}", str(2 * int(groups["mlp"])))
        if groups.get("proj") is not None:
            new = new.replace("{proj}", _PROJECTIONS[groups["proj"].replace("q_", "q").replace("k_", "k")])
        return new
    return None


def convert_hf_single_scale(hf_state_dict: dict[str, Tensor], rules: Rules) -> dict[str, Tensor]:
    """Map a transformers Conditional DETR (``CONDITIONAL_RULES``) or DAB-DETR (``DAB_RULES``) state_dict
    onto codetr names. Raises KeyError naming every parameter it cannot place."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for name, value in hf_state_dict.items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.startswith(_TIED_BOX):
            head_name = "bbox_predictor." + name.removeprefix(_TIED_BOX)
            if head_name in hf_state_dict and not torch.equal(hf_state_dict[head_name], value):
                raise ValueError(f"{name} differs from {head_name}; untied box heads are not supported")
            if head_name in hf_state_dict:
                continue
            name = head_name
        match = _ENCODER_QKV.match(name)
        if match:
            layer, proj, kind = match.groups()
            qkv.setdefault((layer, kind), {})[proj] = value
            continue
        new = _rename(name, rules)
        if new is None:
            unknown.append(name)
        else:
            out[new] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"encoder layer {layer} self-attention {kind}: have only {sorted(parts)}")
        out[f"encoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if unknown:
        raise KeyError(f"cannot convert {len(unknown)} parameter(s): {unknown[:10]}")
    return out


def _require(hf_config: dict, key: str, expected: object, default: object) -> None:
    value = hf_config.get(key, default)
    if value != expected:
        raise ValueError(f"transformers config {key}={value!r} is not supported (codetr's model has {expected!r})")


def _single_scale_config(hf_config: dict, arch: str, d_model: int) -> ModelConfig:
    cfg = ModelConfig(arch=arch)
    backbone = (hf_config.get("backbone_config") or {}).get("backbone") or hf_config.get("backbone") or "resnet50"
    cfg.backbone.name, cfg.backbone.weights, cfg.backbone.out_indices = backbone, None, [3]
    cfg.num_classes = len(hf_config.get("id2label") or {}) or int(hf_config.get("num_labels", 91))
    t = cfg.transformer
    t.d_model, t.num_feature_levels = d_model, 1
    for key in ("attention_heads", "ffn_dim"):
        if hf_config.get(f"encoder_{key}") != hf_config.get(f"decoder_{key}"):
            raise ValueError(f"transformers config encoder_{key} != decoder_{key}: codetr uses one value")
    t.n_heads = hf_config.get("decoder_attention_heads", 8)
    t.ffn_dim = hf_config.get("decoder_ffn_dim", 2048)
    t.enc_layers = hf_config.get("encoder_layers", 6)
    t.dec_layers = hf_config.get("decoder_layers", 6)
    t.num_queries = hf_config.get("num_queries", 300)
    t.dropout = float(hf_config.get("dropout", 0.1))
    t.pos_offset = 0.0
    cfg.loss.cls_weight = float(hf_config.get("cls_loss_coefficient", 2))
    cfg.loss.l1_weight = float(hf_config.get("bbox_loss_coefficient", 5))
    cfg.loss.giou_weight = float(hf_config.get("giou_loss_coefficient", 2))
    cfg.loss.cls_cost = float(hf_config.get("class_cost", 2))
    cfg.loss.focal_alpha = float(hf_config.get("focal_alpha", 0.25))
    return cfg


def conditional_config_from_hf(hf_config: dict) -> ModelConfig:
    """codetr ModelConfig of the Conditional DETR described by a transformers config.json."""
    _require(hf_config, "activation_function", "relu", "relu")
    _require(hf_config, "position_embedding_type", "sine", "sine")
    _require(hf_config, "dilation", False, False)
    cfg = _single_scale_config(hf_config, "conditional_detr", hf_config.get("d_model", 256))
    cfg.transformer.pos_temperature = 10000.0
    return cfg


def dab_config_from_hf(hf_config: dict) -> ModelConfig:
    """codetr ModelConfig of the DAB-DETR described by a transformers config.json."""
    for key, expected, default in [("activation_function", "prelu", "prelu"), ("keep_query_pos", False, False),
                                   ("num_patterns", 0, 0), ("normalize_before", False, False), ("query_dim", 4, 4),
                                   ("dilation", False, False), ("sine_position_embedding_scale", None, None)]:
        _require(hf_config, key, expected, default)
    temperatures = (hf_config.get("temperature_height", 20), hf_config.get("temperature_width", 20))
    if temperatures[0] != temperatures[1]:
        raise ValueError(f"transformers config temperature_height/width {temperatures}: codetr uses one temperature")
    cfg = _single_scale_config(hf_config, "dab_detr", hf_config.get("hidden_size", 256))
    cfg.transformer.pos_temperature = float(temperatures[0])
    return cfg


# format name (``codetr convert hf-...``) -> (config from config.json, rules)
FORMATS: dict[str, tuple[Callable[[dict], ModelConfig], Rules]] = {
    "hf-conditional-detr": (conditional_config_from_hf, CONDITIONAL_RULES),
    "hf-dab-detr": (dab_config_from_hf, DAB_RULES),
}
