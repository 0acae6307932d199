"""Published models in one line: the model-zoo registry (:mod:`~codetr.zoo.registry`), downloading
with resume and hash checks (:mod:`~codetr.zoo.download`), converting and caching
(:mod:`~codetr.zoo.pretrained`), and codetr models on the Hugging Face Hub (:mod:`~codetr.zoo.hub`)."""

from codetr.zoo.hub import download_from_hub, is_repo_id, model_card, push_folder
from codetr.zoo.pretrained import cache_root, fetch_pretrained, is_cached, model_folder, pretrained_folder
from codetr.zoo.registry import RELEASES, Release, find_release, get_release

__all__ = ["RELEASES", "Release", "cache_root", "download_from_hub", "fetch_pretrained", "find_release", "get_release",
           "is_cached", "is_repo_id", "model_card", "model_folder", "pretrained_folder", "push_folder"]
