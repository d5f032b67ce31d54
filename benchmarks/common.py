"""Helpers shared by the benchmark scripts: machine facts, timing, tables, JSON and PNG output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def setup_torch(threads: int, device: str) -> None:
    """Same thread count for every stack in the process; refuse a CUDA run without a GPU."""
    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")


def machine_info(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "platform": platform.platform(), "python": platform.python_version(), "device": device}
    try:
        info["load_avg"] = os.getloadavg()  # a busy machine makes every timing here wrong
    except OSError:
        pass
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


def versions() -> dict:
    import peft
    import transformers

    import alora

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "alora": alora.__version__}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def now() -> float:
    return time.perf_counter()


def result_path(name: str, device: str, quick: bool, ext: str) -> Path:
    """benchmarks/results/<name>[_cuda][_quick].<ext>: a --quick run never overwrites the real results."""
    return RESULTS / f"{name}{'_cuda' if device == 'cuda' else ''}{'_quick' if quick else ''}.{ext}"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    print(f"wrote {path}")


def progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True, leave=False)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """A plain fixed-width table; floats get 3 significant digits."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


class FirstTokenStreamer:
    """A transformers ``generate`` streamer that records when the first new token arrives (``at``).

    ``put`` gets the prompt first, then every new token; ``end`` is called once at the end.
    """

    def __init__(self):
        self.puts, self.at = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = now()

    def end(self) -> None:
        pass
