"""codetr models on the Hugging Face Hub, in codetr's own format: a repository holding
``model.safetensors`` (inference weights, class names, category ids and config in its metadata),
``config.yaml`` and a model card ``README.md``; read and written through ``huggingface_hub``
(``pip install codetr[hub]``), which caches the files (``HF_HOME``) and works offline from that cache
(``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from codetr.errors import UserError
from codetr.files import CONFIG_NAME, WEIGHTS_NAME, atomic_write_text

MODEL_CARD_NAME = "README.md"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hub repository id ``user/name``."""
    return REPO_ID.fullmatch(text) is not None


def _hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.utils  # the error classes, there since 0.20
    except ImportError:
        raise UserError("the Hugging Face Hub needs the optional package huggingface_hub: "
                        "pip install 'codetr[hub]'") from None
    return huggingface_hub


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    """The local folder (the Hub cache's snapshot) holding ``repo_id``'s ``model.safetensors`` and
    ``config.yaml``; a UserError when the repository or a file cannot be had."""
    hub = _hub()
    paths = []
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            paths.append(Path(hub.hf_hub_download(repo_id, filename, revision=revision, library_name="codetr")))
        except hub.utils.LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or no network) and not in the cache
            raise UserError(f"{filename} of {repo_id} is not in the Hugging Face cache and the Hub cannot be reached "
                            "(no network, or HF_HUB_OFFLINE=1)") from None
        except hub.utils.EntryNotFoundError:
            raise UserError(f"Hugging Face repository {repo_id} has no {filename}: not a codetr model "
                            "(Detector.push_to_hub writes one)") from None
        except hub.utils.RepositoryNotFoundError:
            raise UserError(f"{repo_id}: no such Hugging Face repository (or it is private: log in with "
                            "`hf auth login`), and no such local folder") from None
        except OSError as err:  # HfHubHTTPError is one
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"cannot download {filename} of {repo_id} from the Hugging Face Hub ({reason})") from None
    return paths[1].parent


def model_card(repo_id: str, config: dict[str, Any], class_names: list[str], metrics: dict[str, float] | None) -> str:
    """The README.md of a codetr Hub repository: front matter for the Hub, usage, metrics, classes and config."""
    model = config.get("model", {})
    lines = ["---", "library_name: codetr", "pipeline_tag: object-detection", "tags: [object-detection, co-detr, codetr]",
             "---", "", f"# {repo_id.split('/')[-1]}", "",
             f"A {model.get('arch', '?')} detector ({model.get('backbone', {}).get('name', '?')} backbone, "
             f"{len(class_names)} classes) in the format of codetr (a pure-PyTorch Co-DETR; `pip install codetr`).", "",
             "```python", "from codetr import Detector", f'det = Detector.from_pretrained("{repo_id}")',
             'det.predict("image.jpg")[0]', "```", ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.1f} |" if isinstance(value, float) else f"| {name} | {value} |"
                  for name, value in metrics.items()] + [""]
    lines += ["## Classes", "", ", ".join(f"{i}: {name}" for i, name in enumerate(class_names)), "",
              "## Config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def push_folder(folder: Path, repo_id: str, card: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload codetr model") -> str:
    """Write ``card`` as the folder's README.md and upload the folder to ``repo_id`` (created if needed);
    returns the repository's URL."""
    hub = _hub()
    atomic_write_text(folder / MODEL_CARD_NAME, card)
    api = hub.HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                      allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, MODEL_CARD_NAME])
    return str(url)
