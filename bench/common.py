"""Shared by the benchmark scripts: the protocol line, JSON output, and the RESULTS.md row."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "RESULTS.md"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} cores ({cpu_model()}), torch {torch.__version__}, "
            f"{'cuda' if torch.cuda.is_available() else 'cpu'}")


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": machine(),
                                "command": command(), **payload}, indent=1) + "\n")


def append_result(bench: str, protocol: str, result: str) -> None:
    """One dated row in bench/RESULTS.md with the exact command."""
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach row is appended by a script in bench/; rerun the "
                           "command to reproduce it.\n\n| date | bench | command | protocol | result |\n"
                           "|---|---|---|---|---|\n")
    row = [datetime.date.today().isoformat(), bench, f"`{command()}`", protocol, result]
    with RESULTS.open("a") as f:
        f.write("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |\n")


def timed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> float:
    """Seconds of one training step: the loss terms' sum, backward, optimizer step."""
    start = time.perf_counter()
    loss = sum(model.loss(batch).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start
