"""``codetr data synth`` and ``codetr data check``: write the synthetic dataset, check a COCO-format one."""

from __future__ import annotations

import argparse
from typing import Any

from codetr.data.check import MAX_EXAMPLES, check_dataset
from codetr.data.image import DEFAULT_MAX_IMAGE_PIXELS
from codetr.data.synthetic import generate_synthetic_coco


def add_parser(commands: Any) -> None:
    p = commands.add_parser("data", help="dataset tools", description="Dataset tools.")
    data_commands = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    synth = data_commands.add_parser("synth", help="write the built-in synthetic COCO-format dataset",
                                     description="Write the synthetic COCO-format shapes dataset.")
    add_synth_arguments(synth)
    synth.set_defaults(func=run_synth)
    check = data_commands.add_parser("check", help="validate a COCO-format dataset (annotations and image files)",
                                     description="Check a COCO-format dataset: JSON structure and field types, ids, "
                                                 "duplicates, boxes, segmentations, categories, image files present and "
                                                 "decodable, "
                                                 "their sizes and EXIF orientation. Prints a report; exit code 2 when "
                                                 "it finds errors, 0 otherwise (warnings allowed).")
    add_check_arguments(check)
    check.set_defaults(func=run_check)


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``codetr data synth``."""
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=64, help="number of training images (default 64)")
    parser.add_argument("--val", type=int, default=16, help="number of validation images (default 16)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run_synth(args: argparse.Namespace) -> int:
    """Run ``codetr data synth`` with parsed arguments; prints the written paths."""
    paths = generate_synthetic_coco(args.out, args.train, args.val, args.size, args.seed)
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


def main_synth(argv: list[str] | None = None) -> int:
    """``codetr data synth``'s options alone: ``main_synth(["--out", DIR, ...])``."""
    parser = argparse.ArgumentParser(description="Write the synthetic COCO-format shapes dataset.")
    add_synth_arguments(parser)
    return run_synth(parser.parse_args(argv))


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``codetr data check``."""
    parser.add_argument("annotations", help="COCO-format annotation file (instances JSON)")
    parser.add_argument("--images", required=True, help="folder the JSON's file names are relative to")
    parser.add_argument("--no-decode", action="store_true",
                        help="read each image's header only (size, EXIF orientation), not its pixels: faster, but "
                             "truncated or corrupt image data goes unnoticed")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help=f"larger images are errors, as with data.max_image_pixels (default {DEFAULT_MAX_IMAGE_PIXELS}, "
                             "Pillow's decompression-bomb limit; 0: no limit)")
    parser.add_argument("--masks", action="store_true",
                        help="check as for training with masks (data.with_masks): every non-crowd annotation needs a "
                             "segmentation, and unreadable ones or RLE of the wrong size are errors, not warnings")
    parser.add_argument("--examples", type=int, default=5,
                        help=f"occurrences shown per kind of problem (default 5, at most {MAX_EXAMPLES})")


def run_check(args: argparse.Namespace) -> int:
    """Run ``codetr data check``: print the report; exit code 2 when it holds errors, else 0."""
    report = check_dataset(args.annotations, args.images, decode=not args.no_decode,
                           max_pixels=args.max_image_pixels or None, masks=args.masks)
    print(report.format(min(args.examples, MAX_EXAMPLES)))
    return 2 if report.num_errors else 0
