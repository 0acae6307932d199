"""bench/gpu.py's plan, checked without a GPU: every ``codetr`` command line it will run on the
device parses, and every training run's config loads with the settings the row reports. A typo
there would otherwise surface only on a lent GPU, whose time is short."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from codetr.cli import parse_command_line
from codetr.config_parsing import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_training_run_parses_and_loads(gpu_bench, tmp_path):
    runs = [(precision, []) for precision in gpu_bench.PRECISIONS] + [("bf16", k) for k in gpu_bench.KNOBS.values()]
    for precision, extra in runs:
        args = parse_command_line(gpu_bench.training_args(tmp_path / "out", precision, extra, tmp_path, iters=12))
        assert args.command == "train" and args.device == "cuda" and args.overwrite
        cfg = load_config(args.config, args.overrides)
        assert cfg.train.amp == (None if precision == "fp32" else precision)
        assert (cfg.data.batch_size, cfg.train.max_iters, cfg.data.synthetic_size) == (2, 12, 1024)
        assert cfg.data.augment == "lsj"
        expected_canvas = 768 if "data.lsj_size=768" in extra else 1024
        assert cfg.data.lsj_size == expected_canvas
        if not extra:  # the released memory settings, which the knobs change one at a time
            assert (cfg.model.transformer.enc_with_cp, cfg.model.backbone.frozen_stages) == (4, 1)
            assert not cfg.model.backbone.with_cp


def test_the_inference_run_parses(gpu_bench, tmp_path):
    args = parse_command_line(gpu_bench.inference_args(tmp_path / "infer.json"))
    assert args.command == "bench" and args.device == "cuda" and args.compile
    load_config(args.config, [])
