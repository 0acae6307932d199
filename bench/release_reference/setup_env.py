"""Make the reference environment for the training-parity comparison with the released Co-DETR: a
separate venv with pinned torch, mmcv 1.7 (its pure-Python package; the compiled ``mmcv._ext`` is replaced
by ``mmcv_ext_standin.py``) and the release's own dependencies, plus the Sense-X/Co-DETR sources (which
bundle their mmdetection 2.25.3) at a pinned commit. Not run by CI; see docs/co-detr.md.

    python bench/release_reference/setup_env.py --release-src /path/to/Co-DETR   # a git checkout or a folder

Idempotent: an existing venv and source folder are reused. Needs about 8 GB of free disk (torch with its
CUDA libraries is most of it). Then record with ``record.py`` (its docstring has the command).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RELEASE_COMMIT = "26653521e47157fdd819e764b4bb949057ea9f3b"  # Sense-X/Co-DETR main, the release's code
RELEASE_PARTS = ("mmdet", "projects", "mmcv_custom", "configs/_base_")
TORCH = ("torch==2.14.1", "torchvision==0.29.1")
# mmcv's setup.py needs pkg_resources, which newer setuptools dropped
BUILD = ("setuptools==69.5.1", "wheel")
MMCV = ("mmcv==1.7.0",)
# what the release's modules import, pinned; installed without their own requirements
RELEASE_DEPS = ("numpy==2.4.6", "scipy==1.17.1", "pycocotools==2.0.11", "six==1.17.0", "terminaltables==3.1.10",
                "addict==2.4.0", "yapf==0.43.0", "PyYAML==6.0.4", "packaging==26.4", "pillow==13.0.0",
                "opencv-python-headless==5.1.0.95", "matplotlib==3.11.2", "fairscale==0.4.13", "timm==0.9.16",
                "fvcore==0.1.5.post20221221", "iopath==0.1.10", "portalocker==4.4.2", "tabulate==0.10.0",
                "termcolor==3.3.0", "tqdm==4.70.1", "einops==0.8.2")
MIN_FREE_GB = 8


def pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args], check=True)


def make_venv(venv: Path) -> None:
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip(venv, *TORCH)
    pip(venv, *BUILD)
    pip(venv, "--no-deps", "--no-build-isolation", *MMCV)
    pip(venv, "--no-deps", *RELEASE_DEPS)
    [site] = (venv / "lib").glob("python3*/site-packages")
    shutil.copyfile(HERE / "mmcv_ext_standin.py", site / "mmcv" / "_ext.py")


def extract_release(src: Path, dest: Path, commit: str) -> None:
    """The release's ``mmdet``, ``projects``, ``mmcv_custom`` and ``configs/_base_`` into ``dest``: from ``commit`` when ``src``
    is a git repository (work tree or bare), else copied from the folder ``src``."""
    if all((dest / part).exists() for part in RELEASE_PARTS):
        return
    dest.mkdir(parents=True, exist_ok=True)
    is_git = subprocess.run(["git", "-C", str(src), "rev-parse", "--git-dir"], capture_output=True).returncode == 0
    if is_git:
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "release.tar"
            subprocess.run(["git", "-C", str(src), "archive", "-o", str(archive), commit, *RELEASE_PARTS], check=True)
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")
    else:
        for part in RELEASE_PARTS:
            shutil.copytree(src / part, dest / part, dirs_exist_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", type=Path, default=Path.home() / ".cache" / "codetr-reference",
                        help="folder of the venv and the release sources (default ~/.cache/codetr-reference)")
    parser.add_argument("--release-src", type=Path, required=True,
                        help="a Sense-X/Co-DETR git repository (its pinned commit is used) or a folder holding "
                             "its mmdet/, projects/, mmcv_custom/ and configs/_base_/")
    parser.add_argument("--commit", default=RELEASE_COMMIT, help="the release commit (git sources only)")
    args = parser.parse_args()
    args.env.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(args.env).free / 2**30
    if free_gb < MIN_FREE_GB and not (args.env / "venv").exists():
        sys.exit(f"{args.env}: {free_gb:.1f} GB free, the reference environment needs about {MIN_FREE_GB} GB")
    make_venv(args.env / "venv")
    extract_release(args.release_src, args.env / "co-detr", args.commit)
    print(f"reference environment ready: {args.env / 'venv'}, release sources in {args.env / 'co-detr'}")


if __name__ == "__main__":
    main()
