"""``codetr convert``: weights of other implementations (Hugging Face, official mmdet) to codetr safetensors."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from codetr.errors import UserError


def add_parser(commands: Any) -> None:
    p = commands.add_parser("convert", help="convert weights from other implementations",
                            description="Convert weights from other implementations to codetr safetensors.")
    convert_commands = p.add_subparsers(dest="convert_command", required=True, metavar="SOURCE_FORMAT")
    hf = convert_commands.add_parser("hf-deformable-detr", help="Hugging Face transformers Deformable-DETR",
                                     description="Convert a Hugging Face transformers Deformable-DETR model "
                                                 "folder to codetr safetensors.")
    hf.add_argument("src", type=Path, help="transformers model folder (config.json + weights)")
    hf.add_argument("dst", type=Path, help="output .safetensors; config.yaml is written beside it")
    hf.set_defaults(func=run_hf)
    for name, family in [("hf-conditional-detr", "Conditional DETR"), ("hf-dab-detr", "DAB-DETR")]:
        single = convert_commands.add_parser(name, help=f"Hugging Face transformers {family}",
                                             description=f"Convert a Hugging Face transformers {family} model folder "
                                                         "(timm ResNet backbone) to codetr safetensors.")
        single.add_argument("src", type=Path, help="transformers model folder (config.json + weights)")
        single.add_argument("dst", type=Path, help="output .safetensors; config.yaml is written beside it")
        single.set_defaults(func=run_hf_single_scale)
    mmdet = convert_commands.add_parser(
        "mmdet", help="official Co-DETR checkpoints (Sense-X/Co-DETR, mmdet)",
        description="Convert an official Co-DETR checkpoint (Co-Deformable-DETR or Co-DINO of the Sense-X/Co-DETR "
                    "release, Co-DINO of mmdetection 3.x; ResNet or Swin backbone) to codetr safetensors for the "
                    "config of its model-zoo row.")
    mmdet.add_argument("checkpoint", type=Path, help="official .pth ({'state_dict', 'meta'} or a bare state_dict)")
    mmdet.add_argument("--config", required=True,
                       help="codetr config of the checkpoint's model-zoo row, e.g. co_deformable_detr_r50_1x_coco")
    mmdet.add_argument("--out", required=True, type=Path, help="output .safetensors")
    mmdet.add_argument("--keep-aux", action="store_true",
                       help="keep the auxiliary heads and positive-query layers (to fine-tune with Co- training)")
    mmdet.add_argument("--classes", type=Path,
                       help="class names: a COCO-format JSON (names and ids of its categories) or a text file with "
                            "one name per line; default the names in the checkpoint's metadata, else COCO's 80 "
                            "classes for an 80-class checkpoint")
    mmdet.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    mmdet.set_defaults(func=run_mmdet)


def run_hf(args: argparse.Namespace) -> int:
    from codetr.convert.hf_deformable_detr import convert_hf_folder
    from codetr.files import CONFIG_NAME, remove_interrupted_writes

    remove_interrupted_writes(args.dst.parent, [args.dst.name, CONFIG_NAME])
    convert_hf_folder(args.src, args.dst)
    return 0


def run_hf_single_scale(args: argparse.Namespace) -> int:
    from functools import partial

    from codetr.convert.hf_deformable_detr import convert_hf_folder
    from codetr.convert.hf_single_scale import FORMATS, convert_hf_single_scale

    read_config, rules = FORMATS[args.convert_command]
    try:
        convert_hf_folder(args.src, args.dst, read_config, partial(convert_hf_single_scale, rules=rules))
    except (KeyError, ValueError) as err:
        raise UserError(f"{args.src}: {err}") from err
    return 0


def run_mmdet(args: argparse.Namespace) -> int:
    from codetr.convert.mmdet import convert_mmdet_file
    from codetr.convert.mmdet_checkpoint import CheckpointError
    from codetr.files import remove_interrupted_writes

    remove_interrupted_writes(args.out.parent, [args.out.name])
    try:
        convert_mmdet_file(args.checkpoint, args.config, args.out, args.keep_aux, args.classes, args.overrides)
    except (CheckpointError, KeyError, TypeError, ValueError, yaml.YAMLError) as err:
        raise UserError(str(err)) from err
    return 0
