"""Convert transformers' ``DeformableDetrForObjectDetection`` weights to codetr's Deformable-DETR.

Works on the state_dict alone (transformers is not needed): parameter names of transformers
4.x and 5.x are both understood. ``codetr convert hf-deformable-detr SRC DST`` reads a model
folder (config.json + model.safetensors or pytorch_model.bin) and writes DST (.safetensors,
with the class names and config in its metadata) and a ``config.yaml`` beside it, so
``codetr predict --weights DST`` works directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from codetr.config import Config, ModelConfig
from codetr.config_parsing import save_config
from codetr.files import CONFIG_NAME

# (pattern on the transformers name, replacement in codetr naming), applied in order; the
# first match wins. Names without any match are an error.
_RULES: list[tuple[str, str]] = [
    (r"^model\.backbone\.(conv_encoder\.)?model\.(.*)$", r"backbone.\2"),
    (r"^model\.input_proj\.(\d+)\.(\d)\.(weight|bias)$", r"neck.convs.\1.\2.\3"),
    (r"^model\.level_embed$", "level_embed"),
    (r"^model\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm|reference_points)\.(weight|bias)$", r"\1.\2"),
    (r"^model\.query_position_embeddings\.weight$", "query_embedding.weight"),
    # encoder layers
    (r"^model\.encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(.*)$",
     r"encoder.layers.\1.self_attn.\2.\3"),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.(.*)$", r"encoder.layers.\1.norm1.\2"),
    (r"^model\.encoder\.layers\.(\d+)\.(mlp\.)?fc1\.(.*)$", r"encoder.layers.\1.ffn.0.\3"),
    (r"^model\.encoder\.layers\.(\d+)\.(mlp\.)?fc2\.(.*)$", r"encoder.layers.\1.ffn.3.\3"),
    (r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.(.*)$", r"encoder.layers.\1.norm2.\2"),
    # decoder layers (q/k/v projections are packed separately below)
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.(o_proj|out_proj)\.(.*)$", r"decoder_layers.\1.self_attn.out_proj.\3"),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.(.*)$", r"decoder_layers.\1.norm1.\2"),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.(.*)$", r"decoder_layers.\1.cross_attn.\2"),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.(.*)$", r"decoder_layers.\1.norm2.\2"),
    (r"^model\.decoder\.layers\.(\d+)\.(mlp\.)?fc1\.(.*)$", r"decoder_layers.\1.ffn.0.\3"),
    (r"^model\.decoder\.layers\.(\d+)\.(mlp\.)?fc2\.(.*)$", r"decoder_layers.\1.ffn.3.\3"),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.(.*)$", r"decoder_layers.\1.norm3.\2"),
    # prediction branches
    (r"^class_embed\.(\d+)\.(weight|bias)$", r"class_branches.\1.\2"),
    (r"^bbox_embed\.(\d+)\.layers\.(\d)\.(weight|bias)$", "box_branches.{0}.{1}.{2}"),
]
_QKV = re.compile(r"^model\.decoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)$")
_TIED = re.compile(r"^model\.decoder\.(bbox_embed|class_embed)\.")


def _rename(name: str) -> str | None:
    for pattern, replacement in _RULES:
        match = re.match(pattern, name)
        if match:
            if "{0}" in replacement:  # MLP layer k of the box branch sits at Sequential index 2k
                layer, idx, kind = match.groups()
                return replacement.format(layer, 2 * int(idx), kind)
            return match.expand(replacement)
    return None


def convert_hf_deformable_detr(hf_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a transformers Deformable-DETR state_dict onto codetr names.

    Decoder self-attention q/k/v projections are packed into ``in_proj_weight``/``in_proj_bias``.
    With box refinement / two-stage, transformers ties ``model.decoder.{class,bbox}_embed`` to the
    head's ``{class,bbox}_embed``: the copies are checked equal and one is kept (files written by
    ``save_pretrained`` may hold only the decoder's copy).
    Raises KeyError naming every parameter it cannot place.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for name, value in hf_state_dict.items():
        if name.endswith("num_batches_tracked"):
            continue
        if _TIED.match(name):
            head_name = name.removeprefix("model.decoder.")
            if head_name not in hf_state_dict:
                out[_rename(head_name)] = value
            elif not torch.equal(hf_state_dict[head_name], value):
                raise ValueError(f"{name} differs from {head_name}; untied branches are not supported")
            continue
        match = _QKV.match(name)
        if match:
            layer, proj, kind = match.groups()
            qkv.setdefault((layer, kind), {})[proj] = value
            continue
        new = _rename(name)
        if new is None:
            unknown.append(name)
        else:
            out[new] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise KeyError(f"decoder layer {layer} self-attention {kind}: have only {sorted(parts)}")
        out[f"decoder_layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    if unknown:
        raise KeyError(f"cannot convert {len(unknown)} parameter(s): {unknown[:10]}")
    return out


def config_from_hf(hf_config: dict) -> ModelConfig:
    """codetr ModelConfig of the architecture described by a transformers config.json."""
    cfg = ModelConfig(neck_bias=True)
    backbone = (hf_config.get("backbone_config") or {}).get("backbone") or hf_config.get("backbone") or "resnet50"
    cfg.backbone.name, cfg.backbone.weights = backbone, None
    cfg.num_classes = len(hf_config.get("id2label") or {}) or int(hf_config.get("num_labels", 91))
    t = cfg.transformer
    t.d_model = hf_config.get("d_model", 256)
    t.n_heads = hf_config.get("decoder_attention_heads", 8)
    t.n_points = hf_config.get("decoder_n_points", 4)
    t.num_feature_levels = hf_config.get("num_feature_levels", 4)
    t.enc_layers = hf_config.get("encoder_layers", 6)
    t.dec_layers = hf_config.get("decoder_layers", 6)
    t.ffn_dim = hf_config.get("decoder_ffn_dim", 1024)
    t.dropout = 0.0
    t.two_stage = bool(hf_config.get("two_stage", False))
    t.box_refine = bool(hf_config.get("with_box_refine", False))
    t.num_queries = hf_config.get("two_stage_num_proposals", 300) if t.two_stage else hf_config.get("num_queries", 300)
    t.mixed_selection = False
    t.look_forward_twice = False
    return cfg


def _load_state_dict(src: Path) -> dict[str, Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = src / name if src.is_dir() else src
        if path.is_file() and (src.is_dir() or path.name == src.name):
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{src}: no model.safetensors or pytorch_model.bin")


def convert_hf_folder(src: Path, dst: Path, read_config: Callable[[dict], ModelConfig] = config_from_hf,
                      convert_state: Callable[[dict[str, Tensor]], dict[str, Tensor]] = convert_hf_deformable_detr) -> None:
    """Convert the transformers model folder ``src`` (config.json + weights) into the safetensors file
    ``dst``, with ``config.yaml`` beside it (``codetr convert hf-deformable-detr``; ``read_config`` and
    ``convert_state`` of another family for ``hf-conditional-detr`` / ``hf-dab-detr``); prints what it wrote."""
    from codetr.config_parsing import config_to_dict
    from codetr.inference.weights import save_inference_weights
    from codetr.models.build import build_model

    config_path = (src if src.is_dir() else src.parent) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: the transformers config is needed for the sizes")
    hf_config = json.loads(config_path.read_text())
    model_cfg = read_config(hf_config)
    state = convert_state(_load_state_dict(src))
    build_model(model_cfg).load_state_dict(state, strict=True)  # fails loudly on any mismatch
    cfg = Config(model=model_cfg)
    cfg.data.synthetic = False
    labels = {int(k): v for k, v in (hf_config.get("id2label") or {}).items()}
    ids = sorted(labels) if len(labels) == model_cfg.num_classes else list(range(model_cfg.num_classes))
    names = [labels.get(i, f"class_{i}") for i in ids]
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_inference_weights(dst, state, names, ids, config_to_dict(cfg))
    save_config(cfg, dst.parent / CONFIG_NAME)
    print(f"wrote {dst} ({len(state)} tensors) and {dst.parent / CONFIG_NAME}")
