"""How many threads torch computes with on a CPU, chosen on purpose rather than left to OpenMP.

torch defaults to one thread per core and OpenMP threads spin at each barrier, so a step is as slow as its
slowest thread: when other work holds a core (an HTTP server beside the engine, another job), one thread
waits for a core and all the others wait for it. On a 2-core machine with a load average of 3,
`niyama generate` ran at 2.5-2.7 tok/s with two threads and 8.7-10.8 with one. The choice: physical cores
this process may use (hyperthread siblings count once; a cgroup CPU quota caps them), less `reserve` for the
threads that run beside the engine, less the cores other work already holds (the whole part of the 1-minute
load average, with a warning), at least 1. NIYAMA_CPU_THREADS, else the user's OMP_NUM_THREADS, overrides
it. GPUs are left alone.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

THREADS_ENV = "NIYAMA_CPU_THREADS"
RESERVE_ENV = "NIYAMA_CPU_RESERVE"     # cores to leave free; `niyama serve` sets 1 for its HTTP process
log = logging.getLogger("niyama.engine")
_warned = False


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):         # not Linux
        return os.cpu_count() or 1


def physical_cores(sys_cpu: Path = Path("/sys/devices/system/cpu"), cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: distinct (package, core) pairs of its CPUs, capped by a cgroup v2 CPU
    quota; the logical count where /sys does not say."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    try:
        cores = len({((sys_cpu / f"cpu{c}/topology/physical_package_id").read_text().strip(),
                      (sys_cpu / f"cpu{c}/topology/core_id").read_text().strip()) for c in cpus})
    except OSError:
        cores = len(cpus)
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def choose_cpu_threads(reserve: int = 0, environ=os.environ, cores: int | None = None,
                       load: float | None = None) -> tuple[int, str]:
    """(threads, why): NIYAMA_CPU_THREADS, else OMP_NUM_THREADS, else physical cores - `reserve` - the cores
    the load average says other work holds, at least 1."""
    for var in (THREADS_ENV, "OMP_NUM_THREADS"):
        text = environ.get(var, "").strip()
        if not text:
            continue
        try:
            n = int(text.split(",")[0])       # OpenMP's nested form "4,2": the outer level
        except ValueError:
            n = 0
        if n >= 1:
            return n, f"{var}={text}"
        if var == THREADS_ENV:
            raise ValueError(f"{THREADS_ENV}={text!r}: expected a whole number of threads >= 1")
    cores = physical_cores() if cores is None else cores
    load = machine_load()[0] if load is None else load
    n = max(1, cores - reserve)
    why = f"{cores} physical core{'s' * (cores != 1)}" + (f", {reserve} left to threads beside the engine"
                                                         if reserve else "")
    held = int(load)                          # whole cores busy with other work over the last minute
    if held and cores - held < n:
        n = max(1, cores - held)
        why += f", load average {load:.1f}"
    return n, why


def machine_load() -> tuple[float, int]:
    """(1-minute load average, CPUs this process may use); the load is 0 where the OS does not say."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return load, usable_cpus()


def busy(share: float = 1.0) -> str | None:
    """'load average L on N cores' when the load is above `share` x the cores (other work competes for them),
    else None."""
    load, cpus = machine_load()
    return f"load average {load:.1f} on {cpus} cores" if load > share * cpus else None


def set_cpu_threads(device, reserve: int | None = None) -> tuple[int, str] | None:
    """On a CPU device, set torch's intra-op threads by `choose_cpu_threads`; (threads, why), or None off the
    CPU. Warns once when other work left fewer cores than the engine would use. `reserve` None:
    $NIYAMA_CPU_RESERVE or 0."""
    global _warned
    import torch

    if torch.device(device).type != "cpu":
        return None
    if reserve is None:
        try:
            reserve = max(0, int(os.environ.get(RESERVE_ENV, "0")))
        except ValueError:
            raise ValueError(f"{RESERVE_ENV}={os.environ[RESERVE_ENV]!r}: expected a whole number") from None
    n, why = choose_cpu_threads(reserve)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if "load average" in why and not _warned:
        _warned = True
        load, cpus = machine_load()
        log.warning(f"load average {load:.1f} on {cpus} cores: other work holds some of them, so torch computes "
                    f"with {n} thread{'s' * (n > 1)}, not {max(1, physical_cores() - reserve)} (a thread waiting "
                    f"for a busy core stalls every step: 4x slower measured on 2 cores); {THREADS_ENV}=N sets it")
    return n, why
