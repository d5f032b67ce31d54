"""Helpers shared by the benchmark scripts: machine facts, timing, a quiet-machine guard, text, tables, JSON, PNG."""

from __future__ import annotations

import json
import os
import platform
import random
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


# ---- measurement discipline: other processes' CPU use during each sample ----------------------------------

_HZ = os.sysconf("SC_CLK_TCK")  # Linux accounts CPU time in ticks of 1/_HZ s


def _busy_ticks() -> int:
    """Busy ticks (all but idle and iowait; steal included) of the CPUs this process may run on (/proc/stat)."""
    cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
            busy += user + nice + system + irq + softirq + steal
    return busy


def _process_ticks(pids) -> dict[int, int]:
    """utime + stime + cutime + cstime (all threads, and children waited for) of each live process in ``pids``."""
    ticks = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone
            continue
        ticks[pid] = sum(int(f) for f in fields[11:15])  # fields 14-17 of proc(5), counted after "(comm)"
    return ticks


class OtherCpu:
    """``with OtherCpu(pids) as cpu: ...`` -> ``cpu.cores``: cores' worth of CPU other processes used meanwhile.

    The busy time of the CPUs this process may run on (/proc/stat) minus that of this process and of ``pids``
    (e.g. a server under test), from /proc/PID/stat. Both are counted in ticks (``cpu.ticks``, 10 ms on most
    kernels), so a short sample carries a tick or two of noise.
    """

    def __init__(self, pids=()):
        self.pids = {os.getpid(), *pids}

    def __enter__(self) -> "OtherCpu":
        self._t0, self._busy, self._own = now(), _busy_ticks(), _process_ticks(self.pids)
        return self

    def __exit__(self, *exc) -> None:
        own = _process_ticks(self.pids)
        self.seconds = now() - self._t0
        mine = sum(own[p] - self._own[p] for p in own.keys() & self._own.keys())
        self.ticks = max(0, _busy_ticks() - self._busy - mine)
        self.cores = self.ticks / _HZ / self.seconds


class CpuGuard:
    """Rejects and repeats samples taken while other processes used more than ``max_other_cores`` of the CPU.

    ``run(fn, *args)`` calls ``fn`` up to ``1 + retries`` times, until one call ran on a quiet machine; if none
    did, the last sample is kept and flagged. Two ticks of slack absorb the kernel's tick-granular accounting.
    ``summary()`` goes into the results JSON; ``report()`` prints it.
    """

    def __init__(self, max_other_cores: float = 0.2, retries: int = 3, pids=()):
        self.max_other_cores, self.retries, self.pids = max_other_cores, retries, tuple(pids)
        self.samples = self.rejected = self.flagged = 0

    def quiet(self, cpu: OtherCpu) -> bool:
        return cpu.ticks <= self.max_other_cores * cpu.seconds * _HZ + 2

    def run(self, fn, *args, **kwargs):
        """``(fn's result, {"other_cpu_cores", "rejected", "flagged"})`` for the sample kept."""
        for attempt in range(self.retries + 1):
            with OtherCpu(self.pids) as cpu:
                result = fn(*args, **kwargs)
            if self.quiet(cpu):
                break
        flagged = not self.quiet(cpu)
        self.samples, self.rejected, self.flagged = self.samples + 1, self.rejected + attempt, self.flagged + flagged
        return result, {"other_cpu_cores": round(cpu.cores, 3), "rejected": attempt, "flagged": flagged}

    def summary(self) -> dict:
        return {"max_other_cores": self.max_other_cores, "retries": self.retries, "samples": self.samples,
                "rejected": self.rejected, "flagged": self.flagged,
                "rule": "a sample is repeated while other processes used more than max_other_cores cores during it "
                        "(/proc/stat busy time of our CPUs minus that of this process and any server under test); "
                        "after `retries` repeats the last one is kept and counted in `flagged`"}

    def report(self) -> None:
        print(f"\nquiet-machine guard: {self.samples} samples, {self.rejected} rejected and repeated, "
              f"{self.flagged} kept but flagged (other processes > {self.max_other_cores} cores)")


def add_guard_args(p, repeat: bool = True) -> None:
    """``--max-other-cores`` (and ``--retries`` where samples can be repeated) for a benchmark's parser."""
    p.add_argument("--max-other-cores", type=float, default=0.2,
                   help="a sample taken while other processes used more than this many cores is "
                        + ("rejected and repeated (default 0.2)" if repeat else "flagged (default 0.2)"))
    if repeat:
        p.add_argument("--retries", type=int, help="repeats of a rejected sample before it is kept and flagged "
                                                   "(default 3; 0 with --quick: a smoke run only records)")


def guard_from_args(args, pids=()) -> CpuGuard:
    """The guard of a benchmark whose samples can be repeated (``add_guard_args(p)``); ``pids``: see ``OtherCpu``."""
    retries = args.retries if args.retries is not None else (0 if args.quick else 3)
    return CpuGuard(args.max_other_cores, retries, pids)


# ---- text ---------------------------------------------------------------------------------------------------

WORDS = ("the model reads a long conversation about many small things and then answers with care while we wait for "
         "more text to come from this user who asks good questions on every topic under sun water city music "
         "history science people work time year day way world life hand part place case week point number").split()


def filler(n: int, seed: int) -> str:
    """``n`` common words (one token each for the default model's tokenizer), the same for the same seed."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


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
