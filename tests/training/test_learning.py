"""Learning works end to end: the real tiny Deformable-DETR, trained for a bounded number of
steps on a few synthetic images, detects the objects of those images."""

from pathlib import Path

import pytest
import torch

from codetr.config_parsing import load_config
from codetr.data import build_dataloader
from codetr.data.synthetic import generate_synthetic_coco
from codetr.inference.evaluate import evaluate
from codetr.models.build import build_model
from codetr.training.run import train

STEPS = 150

pytestmark = pytest.mark.slow  # a long training


def test_tiny_detector_learns_the_training_images(tmp_path: Path) -> None:
    torch.set_num_threads(1)  # reproducible and fastest on a shared 2-core machine
    data = generate_synthetic_coco(tmp_path / "synth", num_train=4, num_val=0, size=128, seed=0)
    train_images, train_annotations = data["train_images"], data["train_annotations"]
    overrides = [
        # evaluated on the training images: this tests fitting, not generalisation
        f"data.train_images={train_images}", f"data.train_annotations={train_annotations}",
        f"data.val_images={train_images}", f"data.val_annotations={train_annotations}",
        "data.synthetic=false", "data.train_scales=[128]", "data.max_size=160", "data.crop_resize_scales=[128]",
        "data.crop_size=[96,128]", "data.test_scale=128", "data.batch_size=2",
        "model.transformer.enc_layers=1", "model.transformer.dec_layers=2", "model.transformer.num_queries=30",
        "train.epochs=1000", f"train.max_iters={STEPS}", "train.lr=1e-3", "train.lr_steps=[1000]",
        "train.eval_every=0", "train.device=cpu", "train.seed=0",
    ]
    cfg = load_config("deformable_detr_tiny", overrides)

    torch.manual_seed(0)
    loader = build_dataloader(cfg.data, "val")
    untrained = evaluate(build_model(cfg.model), loader.dataset, loader)
    trained = train(cfg, tmp_path / "run")

    assert untrained["AP50"] < 5.0  # the evaluation does not reward a random model
    assert trained["AP50"] > 30.0, trained  # measured 36-71 AP50 for 100-200 steps
    assert trained["AP"] > untrained["AP"] + 10.0
