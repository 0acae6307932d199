"""Interrupted and repeated runs: SIGINT / SIGTERM save a checkpoint and say how to resume, mid-epoch
checkpoints (``train.checkpoint_every``) resume exactly, temporary files of killed saves are removed,
another run's outputs are not overwritten without ``--overwrite``, and ``--resume`` refuses a dataset
whose category ids changed."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_run import FakeDetector, read_jsonl, safetensors_of, tiny_config, write_coco

from codetr.cli import main
from codetr.config_parsing import save_config
from codetr.data import build_dataset
from codetr.data.samplers import TrainBatchSampler, ignore_stop_signals, train_loader
from codetr.errors import UserError
from codetr.files import atomic_write
from codetr.inference.weights import read_checkpoint
from codetr.structures import Batch
from codetr.training.loop import Trainer
from codetr.training.run import train
from codetr.training.signals import TrainingInterrupted

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 training images (2 iterations per epoch at batch 2) and 2 validation images, category ids 3, 17, 90."""
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, "train", [(48, 40, [(4, 6, 20, 16, 3), (26, 20, 18, 14, 90)]), (40, 48, [(10, 10, 16, 24, 17)]),
                               (56, 40, [(2, 2, 30, 30, 90), (36, 8, 12, 20, 3)]), (40, 40, [(5, 5, 20, 20, 17)])])
    write_coco(root, "val", [(48, 40, [(6, 4, 24, 20, 17)]), (40, 40, [(12, 12, 20, 16, 3)])])
    return root


@pytest.fixture(scope="module")
def straight(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of 3 epochs (6 iterations), a metrics record every 4 iterations."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_config(data, log_every=4), out, build_model=FakeDetector)
    return out


def signal_at(iteration: int, sig: signal.Signals, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process receives ``sig`` during training step ``iteration`` (1-based)."""
    real_step = Trainer.step

    def step(self: Trainer, batches: list[Batch]) -> None:
        real_step(self, batches)
        if self.iteration == iteration:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(Trainer, "step", step)


def assert_same_run(run: Path, reference: Path) -> None:
    """The same final weights, bit for bit, and the same metrics records (losses and evaluations)."""
    weights, expected = safetensors_of(run / "model.safetensors")[0], safetensors_of(reference / "model.safetensors")[0]
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    records, straight = read_jsonl(run / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [(r["type"], r["iter"]) for r in records] == [(r["type"], r["iter"]) for r in straight]
    assert [r["loss"] for r in records if r["type"] == "train"] == [r["loss"] for r in straight if r["type"] == "train"]
    assert [r["AP"] for r in records if r["type"] == "eval"] == [r["AP"] for r in straight if r["type"] == "eval"]


# ------------------------------------------------------------------------------------- stop signals


@pytest.mark.parametrize("sig, iteration, epoch, iter_in_epoch", [
    (signal.SIGTERM, 3, 1, 1),  # mid-epoch
    (signal.SIGINT, 4, 2, 0),  # an epoch's last step: its evaluation runs on resume
])
@pytest.mark.slow
def test_a_stop_signal_checkpoints_the_step_and_resume_is_exact(
        sig: signal.Signals, iteration: int, epoch: int, iter_in_epoch: int, data: Path, straight: Path,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # SIGINT: SIG_IGN in a background job
    signal_at(iteration, sig, monkeypatch)
    with pytest.raises(TrainingInterrupted) as stop:
        train(tiny_config(data, log_every=4), out, build_model=FakeDetector)
    monkeypatch.undo()
    assert (stop.value.signal_name, stop.value.iteration, stop.value.checkpoint) == (sig.name, iteration, out / "last.pt")
    assert f"training stopped by {sig.name} after iteration {iteration}" in str(stop.value)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # the usual handlers are back
    ckpt = read_checkpoint(out / "last.pt")
    assert (ckpt["iteration"], ckpt["epoch"], ckpt["iter_in_epoch"]) == (iteration, epoch, iter_in_epoch)
    assert not (out / "model.safetensors").exists()  # the run is not finished
    train(tiny_config(data, log_every=4), out, resume=True, build_model=FakeDetector)
    assert_same_run(out, straight)


@pytest.mark.slow
def test_a_stop_signal_during_an_evaluation_abandons_it_and_resume_evaluates_first(
        data: Path, straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while the epoch-2 evaluation predicts the first of its 2 images: the second is not
    predicted, the checkpoint holds step 4 and no evaluation of step 4 is recorded; the resumed run
    evaluates first and ends as the uninterrupted one."""
    out, predicted = tmp_path / "run", []
    real_predict = FakeDetector.predict

    def predict(self: FakeDetector, batch: Batch) -> list:
        predicted.append(batch.targets[0].image_id)
        if len(predicted) == 3:  # epoch 1 evaluated 2 images
            os.kill(os.getpid(), signal.SIGTERM)
        return real_predict(self, batch)

    monkeypatch.setattr(FakeDetector, "predict", predict)
    with pytest.raises(TrainingInterrupted) as stop:
        train(tiny_config(data, log_every=4), out, build_model=FakeDetector)
    monkeypatch.undo()
    assert len(predicted) == 3 and stop.value.iteration == 4
    assert read_checkpoint(out / "last.pt")["iteration"] == 4
    assert [r["iter"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"] == [2]
    train(tiny_config(data, log_every=4), out, resume=True, build_model=FakeDetector)
    assert_same_run(out, straight)


def start_codetr_train(config: Path, out: Path) -> subprocess.Popen:
    """``codetr train CONFIG --out OUT`` with the tests' FakeDetector in another process, once it has
    logged its first step."""
    script = ("import sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv.pop(1)); "
              "import codetr.models.build; from test_run import FakeDetector; "
              "codetr.models.build.build_model = FakeDetector; from codetr.cli import main; sys.exit(main())")
    process = subprocess.Popen([sys.executable, "-c", script, str(ROOT / "tests" / "training"), "train", str(config), "--out", str(out)],
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().endswith("\n"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(process.communicate())
        time.sleep(0.02)
    return process


@pytest.mark.slow
def test_sigint_during_codetr_train_says_how_to_resume(data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``codetr train`` process gets SIGINT after its first logged step: it saves, prints the command to resume
    and exits 130; that command continues the iteration count. (The detector is the tests' FakeDetector, for
    speed; that a resume after a stop signal ends with the weights of an uninterrupted run is shown above with
    the same handler, and for the real Co-DETR after a stop in test_run.)"""
    config = tmp_path / "run.yaml"
    save_config(tiny_config(data, epochs=10_000, eval_every=0), config)
    out = tmp_path / "run"
    process = start_codetr_train(config, out)
    try:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=240)
    finally:
        process.kill()
    stopped = read_checkpoint(out / "last.pt")["iteration"]
    assert process.returncode == 130, err
    assert f"training stopped by SIGINT after iteration {stopped} (epoch {(stopped + 1) // 2}); checkpoint {out / 'last.pt'}" in err
    command = next(line for line in err.splitlines() if line.startswith("resume with: "))
    assert command == f"resume with: codetr train {config} --out {out} --resume"
    assert "Traceback" not in err

    monkeypatch.setattr("codetr.models.build.build_model", FakeDetector)
    assert main([*shlex.split(command.removeprefix("resume with: "))[1:], f"train.max_iters={stopped + 1}"]) == 0
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["iter"] for r in records if r["type"] == "train"] == list(range(1, stopped + 2))
    assert (out / "model.safetensors").is_file()


# -------------------------------------------------------------------------------- mid-epoch checkpoints


def test_checkpoint_every_writes_mid_epoch_and_resume_is_exact(data: Path, straight: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    real_step = Trainer.step

    def dying_step(self: Trainer, batches: list[Batch]) -> None:  # killed during step 6
        if self.iteration == 5:
            raise KeyboardInterrupt
        real_step(self, batches)

    monkeypatch.setattr(Trainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, log_every=4, checkpoint_every=1), out, build_model=FakeDetector)
    monkeypatch.undo()
    ckpt = read_checkpoint(out / "last.pt")
    assert (ckpt["iteration"], ckpt["epoch"], ckpt["iter_in_epoch"]) == (5, 2, 1)  # after step 5, mid-epoch 3
    train(tiny_config(data, log_every=4, checkpoint_every=1), out, resume=True, build_model=FakeDetector)
    # the weights and also the metrics: the record at iteration 6 averages steps 5 (before the kill) and 6
    assert_same_run(out, straight)


# ------------------------------------------------------------------------------- temporary files


@pytest.mark.slow
def test_temporary_files_of_a_killed_save_are_removed_at_the_next_start(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    train(tiny_config(data, max_iters=1), out, build_model=FakeDetector)
    # a process that dies in the middle of atomic_write (as after a kill -9) leaves its temporary file
    child = os.fork()
    if child == 0:
        try:
            atomic_write(out / "last.pt", lambda f: (f.write(bytes(1000)), f.flush(), os._exit(9)))
        finally:
            os._exit(1)  # never back into pytest
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 9
    orphans = [p for p in out.iterdir() if p.name.startswith(".last.pt.") and p.name.endswith(".tmp")]
    assert len(orphans) == 1 and orphans[0].stat().st_size == 1000
    (out / ".notes.tmp").write_text("not ours")
    capsys.readouterr()
    train(tiny_config(data, max_iters=2), out, resume=True, build_model=FakeDetector)
    assert f"removed 1 temporary file(s) of interrupted saves in {out} (0.0 MB): {orphans[0].name}" in capsys.readouterr().out
    assert not orphans[0].exists() and (out / ".notes.tmp").exists()
    assert read_checkpoint(out / "last.pt")["iteration"] == 2


# ------------------------------------------------------------------------------ another run's outputs


@pytest.mark.slow
def test_a_previous_runs_outputs_need_overwrite(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(data, epochs=1), out, build_model=FakeDetector)
    (out / "last.pt").unlink()  # e.g. deleted to save space: the run cannot be resumed
    kept = {name: (out / name).read_bytes() for name in ("model.safetensors", "metrics.jsonl", "config.yaml")}
    with pytest.raises(UserError, match=rf"{out} holds the outputs of another run \(model.safetensors, metrics.jsonl, "
                                        r"training.png, config.yaml\) but no last.pt.*--overwrite"):
        train(tiny_config(data, epochs=1), out, build_model=FakeDetector)
    assert {name: (out / name).read_bytes() for name in kept} == kept  # nothing was touched

    train(tiny_config(data, epochs=1, seed=8), out, build_model=FakeDetector, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != kept["model.safetensors"]
    assert [r["iter"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"] == [1, 2]
    # with a checkpoint: --overwrite starts over too, --resume and --overwrite exclude each other
    train(tiny_config(data, epochs=1), out, build_model=FakeDetector, overwrite=True)
    assert read_checkpoint(out / "last.pt")["iteration"] == 2
    with pytest.raises(UserError, match="pass one of them"):
        train(tiny_config(data, epochs=1), out, resume=True, overwrite=True, build_model=FakeDetector)
    with pytest.raises(SystemExit):
        main(["train", "deformable_detr_tiny", "--out", str(out), "--resume", "--overwrite"])


# ------------------------------------------------------------------------------ changed category ids


def test_resume_refuses_changed_category_ids(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(data, max_iters=1), out, build_model=FakeDetector)
    assert read_checkpoint(out / "last.pt")["category_ids"] == [3, 17, 90]
    renumbered = tmp_path / "renumbered"
    renumbered.mkdir()
    for split in ("train", "val"):  # the same 3 classes, the last one now with id 91
        coco = json.loads((data / "annotations" / f"instances_{split}.json").read_text())
        for item in coco["categories"] + coco["annotations"]:
            key = "id" if "name" in item else "category_id"
            item[key] = 91 if item[key] == 90 else item[key]
        (renumbered / f"{split}.json").write_text(json.dumps(coco))
    cfg = tiny_config(data)
    cfg.data.train_annotations, cfg.data.val_annotations = str(renumbered / "train.json"), str(renumbered / "val.json")
    with pytest.raises(UserError, match=rf"{out / 'last.pt'} was trained on other category ids than "
                                        rf"{renumbered / 'train.json'} has now \(label 2: id 90 -> 91\)"):
        train(cfg, out, resume=True, build_model=FakeDetector)


def test_data_loader_workers_ignore_stop_signals(data: Path) -> None:
    """A Ctrl-C reaches the whole process group: the training loader's workers must survive it so that the
    main process can finish its step and save."""
    dataset = build_dataset(tiny_config(data).data, "train")
    sampler = TrainBatchSampler(len(dataset), 2, seed=0)
    assert train_loader(dataset, sampler, 1, 0).worker_init_fn is ignore_stop_signals
    child = os.fork()
    if child == 0:  # as a worker process: after its init function, both signals leave it running
        code = 1  # a KeyboardInterrupt (SIGINT not ignored) leaves it at 1; SIGTERM not ignored kills the process
        try:
            ignore_stop_signals(0)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            code = 0
        finally:
            os._exit(code)  # never back into pytest
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0


# ------------------------------------------------------------------------------------ one run per folder


@pytest.mark.slow
def test_a_second_codetr_train_into_a_running_runs_folder_stops_naming_it(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """While `codetr train` runs in a folder, a second `codetr train --resume` (or `--overwrite`) there stops
    with one line naming the running process and changes nothing; SIGTERM then ends the running one with
    a checkpoint and no temporary file, and the kernel releases its lock: the resume goes on."""
    config = tmp_path / "run.yaml"
    save_config(tiny_config(data, epochs=10_000, eval_every=0), config)
    out = tmp_path / "run"
    monkeypatch.setattr("codetr.models.build.build_model", FakeDetector)
    process = start_codetr_train(config, out)
    try:
        for flag in ("--resume", "--overwrite"):
            assert main(["train", str(config), "--out", str(out), flag]) == 2
            err = capsys.readouterr().err
            assert (f"codetr: error: --out {out} is in use by another codetr run (pid {process.pid} on host "
                    f"{socket.gethostname()}): wait for it to end, or choose another folder") in err
        assert process.poll() is None  # the running run goes on
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 143 and "training stopped by SIGTERM" in err and "Traceback" not in err, err
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    stopped = read_checkpoint(out / "last.pt")["iteration"]
    assert main(["train", str(config), "--out", str(out), "--resume", f"train.max_iters={stopped + 1}"]) == 0
    assert read_checkpoint(out / "last.pt")["iteration"] == stopped + 1
