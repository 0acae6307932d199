"""The Python API: ``Detector`` wraps the same code paths as the ``codetr`` commands.

    from codetr import Detector
    det = Detector("co_deformable_detr_tiny", weights="runs/demo/model.safetensors")
    result = det.predict("image.jpg")[0]
    result.boxes, result.scores, result.labels, result.names   # xyxy pixels of the image
    result.masks                                               # (K, H, W) bool, or None (box-only model)

``predict`` runs :meth:`codetr.inference.loading.LoadedModel.detect` (what ``codetr predict``
runs), ``evaluate`` :func:`codetr.inference.evaluate.evaluate_on_val` (``codetr eval``),
``train`` :func:`codetr.training.run.train` (``codetr train``) and ``export``
:func:`codetr.export.export_onnx` (``codetr export``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from codetr.config import Config
from codetr.config_parsing import check_unit_interval, config_from_dict, config_to_dict, load_config, save_config
from codetr.data.image import read_image, to_rgb
from codetr.devices import resolve_device
from codetr.files import CONFIG_NAME, WEIGHTS_NAME
from codetr.inference.loading import ImageDetector, LoadedModel, build_detector, build_loaded, load_model
from codetr.inference.predict import list_images, select_detections
from codetr.inference.tta import TTADetector
from codetr.inference.weights import save_inference_weights
from codetr.structures import Detections

if TYPE_CHECKING:
    import supervision

ImageSource = Union[str, Path, Image.Image, np.ndarray, Tensor]


@dataclass
class Prediction:
    """Detections in one input image, best first.

    boxes:  (K, 4) float32, xyxy in pixels of the input image.
    scores: (K,) float32 in [0, 1], descending.
    labels: (K,) int64 contiguous labels 0..C-1 (``category_ids[label]`` is the dataset id).
    names:  the class name of each detection.
    path:   the image file, when the input was one.
    masks:  (K, H, W) bool instance masks in pixels of the input image, or None (a box-only model,
            or test-time augmentation, which merges boxes only).
    mask_scores: (K,) float32 in [0, 1], each mask's own score (box score x the mask IoU head's
            predicted IoU; the released Co-DINO-Inst ranks its ``segm`` results by it), or None.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    path: Path | None = None
    masks: Tensor | None = None
    mask_scores: Tensor | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def to_supervision(self) -> "supervision.Detections":
        """These detections as ``supervision.Detections`` (needs ``pip install supervision``),
        class names in ``data["class_name"]``, masks (if any) in ``mask`` ((K, H, W) bool) and
        their scores in ``data["mask_score"]``."""
        try:
            import supervision
        except ImportError:
            raise ImportError("Prediction.to_supervision needs the optional package supervision: "
                              "pip install supervision") from None
        return supervision.Detections(xyxy=self.boxes.numpy().astype(np.float32),
                                      confidence=self.scores.numpy().astype(np.float32),
                                      class_id=self.labels.numpy().astype(int),
                                      mask=None if self.masks is None else self.masks.numpy().astype(bool),
                                      data={"class_name": np.array(self.names, dtype=str),
                                            **({} if self.mask_scores is None else
                                               {"mask_score": self.mask_scores.numpy().astype(np.float32)})})


class Detector:
    """A Co-DETR / DETR detector: predict, train, evaluate, save and export.

    ``config`` is a YAML file or the name of a packaged config (``codetr/configs``);
    ``weights`` a ``model.safetensors`` or a training checkpoint (``last.pt``), or None for the
    config's initialisation (to train); ``device`` "auto" (CUDA when available), "cpu",
    "cuda:1", ...
    """

    def __init__(self, config: str | Path | None, weights: str | Path | None = None, device: str = "auto", *,
                 providers: list[Any] | None = None, onnx: bool | None = None) -> None:
        """``weights`` may also be an ONNX file written by :meth:`export` (``onnx``: True, or None and
        a ``.onnx`` file name), run with onnxruntime (:meth:`from_onnx`): ``config`` is then None (the
        file holds its config) and ``providers`` onnxruntime's (default: those of ``device``)."""
        if weights is not None and (onnx if onnx is not None else Path(weights).suffix == ".onnx"):
            from codetr.export import OnnxDetector

            if config is not None:
                raise ValueError("an ONNX model carries its own config: pass config=None")
            self.device = torch.device("cpu")  # no PyTorch model
            self._use(OnnxDetector(weights, providers, device), Path(weights))
            return
        if config is None and weights is None:
            raise ValueError("Detector needs a config, weights, or both")
        self.device = resolve_device(device)
        if weights is None:
            cfg = load_config(config)
            self._use(LoadedModel(build_detector(cfg.model).to(self.device).eval(), cfg, None, None), None)
        else:
            self._use(load_model(weights, config, device=self.device), Path(weights))

    def _use(self, runner: ImageDetector, source: Path | None) -> None:
        """Run ``runner`` (a PyTorch :class:`LoadedModel` or an ONNX model) from now on."""
        self._runner = runner
        self._loaded = runner if isinstance(runner, LoadedModel) else None
        self.source = source  # the weights or ONNX file; None: the config's initialisation
        self.cfg: Config = runner.cfg

    # ---- other constructors ----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str = "auto") -> Detector:
        """Load a published or saved detector, ``name_or_path`` being:

        - a folder holding ``model.safetensors`` and ``config.yaml`` (what ``codetr train`` and
          :meth:`save_pretrained` write), or a weights file (its config beside it or stored in it);
        - a model-zoo name (``codetr weights list``, e.g. ``"co_dino_5scale_lsj_r50_1x_coco"``): the
          released checkpoint is downloaded, checked, converted and cached on first use, then loaded
          from the cache without network (:mod:`codetr.zoo`);
        - a Hugging Face Hub repository ``"user/name"`` written by :meth:`push_to_hub` (needs
          ``pip install 'codetr[hub]'``).
        """
        from codetr.zoo import pretrained_folder

        folder = pretrained_folder(name_or_path)
        if folder.is_file():
            return cls(None, folder, device)
        missing = [name for name in (WEIGHTS_NAME, CONFIG_NAME) if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a pretrained detector folder: no {' and no '.join(missing)}")
        return cls(folder / CONFIG_NAME, folder / WEIGHTS_NAME, device)

    @classmethod
    def from_onnx(cls, path: str | Path, providers: list[Any] | None = None, device: str = "auto") -> Detector:
        """Run an ONNX file written by :meth:`export` / ``codetr export`` with onnxruntime, with
        ``providers`` or those of ``device`` ("auto": CUDA when PyTorch and onnxruntime have it,
        else the CPU; :func:`codetr.export.runtime.onnx_providers`). Only ``predict`` is available on it."""
        return cls(None, path, device, providers=providers, onnx=True)

    # ---- inference -------------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        """The PyTorch detector (eval mode)."""
        return self._torch("model").model

    @property
    def class_names(self) -> list[str]:
        """Name of each contiguous label (``class_<i>`` when the weights store none)."""
        return self._runner.labels()[0]

    @property
    def category_ids(self) -> list[int]:
        """Dataset category id of each contiguous label (``0..C-1`` when the weights store none)."""
        return self._runner.labels()[1]

    def predict(self, source: ImageSource | Sequence[ImageSource], score_thr: float = 0.3,
                tta: bool = False) -> list[Prediction]:
        """Detections with score >= ``score_thr``, one :class:`Prediction` per image.

        ``source``: an image file, a folder (its images, sorted by name), a PIL image, an
        ndarray (H, W, 3) uint8 RGB, a tensor (3, H, W) RGB (uint8, or float in [0, 1]), or a
        list of those. Each image runs alone through the evaluation pre-processing (as
        ``codetr predict`` and ``codetr eval``). ``tta``: test-time augmentation as configured
        in ``cfg.data.tta`` (:mod:`codetr.inference.tta`; ``codetr predict --tta``).
        ``score_thr`` outside [0, 1] is a UserError.
        """
        score_thr = check_unit_interval(score_thr, "score_thr")
        names = self.class_names
        runner = TTADetector(self._runner) if tta else self._runner
        results = []
        for image, path in _images(source, self.cfg.data.max_image_pixels):
            det: Detections = runner.detect(image)
            det = select_detections(det, det.scores >= score_thr)
            results.append(Prediction(det.boxes, det.scores, det.labels, [names[i] for i in det.labels.tolist()],
                                      path, det.masks, det.mask_scores))
        return results

    # ---- training, evaluation, saving, export ----------------------------------------------------

    def train(self, out: str | Path, resume: bool = False, overwrite: bool = False, **overrides: Any) -> dict[str, float]:
        """Train as ``codetr train CONFIG --out OUT [--resume | --overwrite] key=value ...``; returns the
        final COCO metrics (percent) and loads the trained weights into this detector.

        Overrides are dotted config keys (``**{"model.co.lambda1": 0.5}``) or a field name found
        in one config section only (``epochs=2``, ``lr=1e-4``, ``batch_size=4``). A detector
        loaded from weights trains from them; one built from a config alone starts from the
        config's initialisation, as ``codetr train``.
        """
        from codetr.training.run import train

        loaded = self._torch("train")
        values = config_to_dict(self.cfg)
        for name, value in overrides.items():
            *parents, leaf = override_key(name).split(".")
            node = values
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        cfg = config_from_dict(values, source="config")
        if cfg.train.device == "auto":
            cfg.train.device = str(self.device)
        start = None
        if self.source is not None:
            state, source = loaded.model.state_dict(), str(self.source)

            def start(model_cfg: Any) -> torch.nn.Module:  # the loaded weights, in the (overridden) architecture
                return build_loaded(model_cfg, state, source)

        metrics = train(cfg, out, resume=resume, build_model=start, overwrite=overwrite)
        out = Path(out)
        self._use(load_model(out / WEIGHTS_NAME, out / CONFIG_NAME, device=self.device), out / WEIGHTS_NAME)
        return metrics

    def evaluate(self, tta: bool = False) -> dict[str, float]:
        """Box metrics (percent; COCO or LVIS by ``cfg.data.eval_style``) on the config's
        validation data, as ``codetr eval``; ``tta``: with test-time augmentation, as
        ``codetr eval --tta``."""
        from codetr.inference.evaluate import evaluate_on_val

        loaded = self._torch("evaluate")
        detect = TTADetector(loaded).detect if tta else None
        return evaluate_on_val(loaded.model, self.cfg.data, loaded.category_ids, str(self.source or "the model"),
                               detect)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.yaml`` and ``model.safetensors`` (inference weights, class names and
        category ids) into ``folder``, for :meth:`from_pretrained`. Returns the folder."""
        loaded = self._torch("save_pretrained")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, folder / CONFIG_NAME)
        names, ids = loaded.labels()
        save_inference_weights(folder / WEIGHTS_NAME, loaded.model.inference_state_dict(), names, ids,
                               config_to_dict(self.cfg))
        return folder

    def push_to_hub(self, repo_id: str, metrics: dict[str, float] | None = None, private: bool | None = None,
                    token: str | None = None) -> str:
        """Upload :meth:`save_pretrained`'s files and a model card (config, class names, ``metrics``) to
        the Hugging Face Hub repository ``repo_id`` (created if needed; ``pip install 'codetr[hub]'``,
        logged in with ``hf auth login`` or ``token``); returns its URL. :meth:`from_pretrained` loads it."""
        import tempfile

        from codetr.zoo import model_card, push_folder

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            card = model_card(repo_id, config_to_dict(self.cfg), self.class_names, metrics)
            return push_folder(Path(folder), repo_id, card, private, token)

    def export(self, path: str | Path, opset: int | None = None, grid_sample: bool = True) -> Path:
        """Write the inference graph as ONNX (``codetr export``); see :mod:`codetr.export.onnx`."""
        from codetr.export import DEFAULT_OPSET, export_onnx

        return export_onnx(self._torch("export"), path, DEFAULT_OPSET if opset is None else opset, grid_sample)

    def _torch(self, action: str) -> LoadedModel:
        if self._loaded is None:
            raise RuntimeError(f"Detector.{action} needs the PyTorch model; this detector runs an ONNX file "
                               "(Detector.from_onnx), which only predicts")
        return self._loaded

    def __repr__(self) -> str:
        return f"Detector({self.cfg.model.arch}, {self.cfg.model.num_classes} classes, source={self.source})"


def override_key(name: str, keys: Sequence[str] | None = None) -> str:
    """A dotted config key, or the one key among ``keys`` (default: every field of
    :class:`~codetr.config.Config`, dotted) whose last part is ``name``."""
    if "." in name:
        return name
    found = [key for key in (_dotted_fields(Config) if keys is None else keys) if key.rsplit(".", 1)[-1] == name]
    if len(found) != 1:
        raise KeyError(f"config override {name!r} " + (f"is ambiguous: {', '.join(found)}; pass the dotted key"
                                                        if found else "names no config field"))
    return found[0]


def _dotted_fields(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += _dotted_fields(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _images(source: ImageSource | Sequence[ImageSource],
            max_pixels: int | None) -> Iterator[tuple[Tensor, Path | None]]:
    """Every image of ``source`` as ((3, H, W) RGB tensor, file path or None), read one at a time;
    files and PIL images upright (EXIF orientation applied) and in 8-bit RGB (:mod:`codetr.data.image`)."""
    if isinstance(source, (list, tuple)):
        for element in source:
            yield from _images(element, max_pixels)
    elif isinstance(source, (str, Path)):
        for path in list_images(source):
            yield read_image(path, max_pixels), path
    elif isinstance(source, Image.Image):
        yield F.pil_to_tensor(to_rgb(source)), None
    elif isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[-1] != 3 or source.dtype != np.uint8:
            raise ValueError(f"an ndarray image must be (H, W, 3) uint8 RGB, got {source.shape} {source.dtype}")
        yield torch.from_numpy(source.copy()).permute(2, 0, 1), None  # a copy: the array may be read-only
    elif isinstance(source, Tensor):
        if source.ndim != 3 or source.shape[0] != 3:
            raise ValueError(f"a tensor image must be (3, H, W) RGB, got {tuple(source.shape)}")
        if source.dtype != torch.uint8 and not source.is_floating_point():
            raise ValueError(f"a tensor image must be uint8 or float in [0, 1], got {source.dtype}")
        yield source.detach().cpu(), None
    else:
        raise TypeError(f"cannot read an image from {type(source).__name__}: give a path, folder, PIL image, "
                        "ndarray (H, W, 3) uint8 or tensor (3, H, W)")
