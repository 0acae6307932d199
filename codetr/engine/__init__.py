"""Training loop with hooks, COCO evaluation, prediction on image files, training plots."""

from codetr.engine.evaluator import evaluate
from codetr.engine.predictor import load_model, predict_images
from codetr.engine.trainer import Hook, Trainer, TrainingInterrupted, train

__all__ = ["Hook", "Trainer", "TrainingInterrupted", "evaluate", "load_model", "predict_images", "train"]
