"""Running trained detectors: the one build + load path, weights files, prediction, drawing, test-time augmentation, evaluation."""
