"""``codetr weights list`` and ``codetr weights get``: the published models, downloaded, checked,
converted and cached (:mod:`codetr.zoo`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from codetr.zoo import RELEASES, cache_root, fetch_pretrained, is_cached


def add_parser(commands: Any) -> None:
    p = commands.add_parser("weights", help="the published models: list them, download and convert one",
                            description="The published Co-DETR models (the model zoo), cached converted in "
                                        "$CODETR_CACHE (default $XDG_CACHE_HOME/codetr or ~/.cache/codetr).")
    weights_commands = p.add_subparsers(dest="weights_command", required=True, metavar="WEIGHTS_COMMAND")
    listing = weights_commands.add_parser("list", help="the model zoo as a table, with what is cached",
                                          description="List the model zoo: name, backbone, data, published AP, "
                                                      "where the file comes from and whether it is cached.")
    listing.set_defaults(func=run_list)
    get = weights_commands.add_parser(
        "get", help="download, check, convert and cache a published model",
        description="Download a published checkpoint (resuming an interrupted download), check its SHA-256, convert "
                    "it (as codetr convert mmdet) and cache model.safetensors and config.yaml; prints their folder, "
                    "which Detector.from_pretrained(NAME) then loads without network.")
    get.add_argument("name", help="model-zoo name (codetr weights list)")
    get.add_argument("--file", type=Path,
                     help="a checkpoint downloaded by hand (the models only on Google Drive): checked and converted")
    get.add_argument("--force", action="store_true", help="download and convert again even when cached")
    get.set_defaults(func=run_get)


def run_list(args: argparse.Namespace) -> int:
    rows = [("name", "backbone", "data", "AP", "file", "cached")]
    for r in RELEASES:
        source = "hub" if r.hub else "download" if r.url else "by hand"
        rows.append((r.name, r.backbone, r.data, "-" if r.ap is None else f"{r.ap:.1f}", source,
                     "yes" if is_cached(r.name) else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"cache: {cache_root()}; AP: the publisher's box AP (COCO val2017; LVIS val for LVIS models)")
    return 0


def run_get(args: argparse.Namespace) -> int:
    print(fetch_pretrained(args.name, args.file, args.force))
    return 0
