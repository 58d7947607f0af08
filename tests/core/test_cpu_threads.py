"""How many CPU threads torch gets: env overrides, the reserve for threads beside the engine, the cores other work
holds, at least 1; only on a CPU device."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from niyama.engine import cpu_threads  # noqa: E402
from niyama.engine.cpu_threads import choose_cpu_threads, physical_cores, set_cpu_threads  # noqa: E402


def test_physical_cores_minus_the_reserve_at_least_one():
    assert choose_cpu_threads(0, {}, cores=8, load=0.0)[0] == 8
    assert choose_cpu_threads(1, {}, cores=8, load=0.0) == (7, "8 physical cores, 1 left to threads beside the engine")
    assert choose_cpu_threads(1, {}, cores=1, load=0.0)[0] == 1
    assert choose_cpu_threads(4, {}, cores=2, load=0.0)[0] == 1


def test_cores_other_work_holds_are_left_to_it():
    assert choose_cpu_threads(0, {}, cores=2, load=0.9)[0] == 2           # less than a core busy: all of them
    n, why = choose_cpu_threads(0, {}, cores=2, load=3.7)
    assert n == 1 and "load average 3.7" in why
    assert choose_cpu_threads(0, {}, cores=16, load=4.2)[0] == 12
    assert choose_cpu_threads(4, {}, cores=16, load=2.5) == (12, "16 physical cores, 4 left to threads beside the "
                                                                  "engine")   # the reserve already covers it


def test_env_overrides_win_niyamas_first():
    assert choose_cpu_threads(1, {"NIYAMA_CPU_THREADS": "3"}, cores=2, load=9.0) == (3, "NIYAMA_CPU_THREADS=3")
    assert choose_cpu_threads(0, {"OMP_NUM_THREADS": "4,2"}, cores=2, load=0.0) == (4, "OMP_NUM_THREADS=4,2")
    assert choose_cpu_threads(0, {"NIYAMA_CPU_THREADS": "1", "OMP_NUM_THREADS": "4"}, cores=8, load=0.0)[0] == 1
    assert choose_cpu_threads(0, {"OMP_NUM_THREADS": "lots"}, cores=2, load=0.0)[0] == 2    # not ours: ignored
    for bad in ("0", "two"):
        with pytest.raises(ValueError, match="NIYAMA_CPU_THREADS"):
            choose_cpu_threads(0, {"NIYAMA_CPU_THREADS": bad}, cores=2, load=0.0)


def test_physical_cores_count_hyperthread_siblings_once(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for cpu, core in enumerate((0, 1, 0, 1)):           # cpu2, cpu3: the siblings of cpu0, cpu1
        topo = tmp_path / "cpu" / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{core}\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert physical_cores(tmp_path / "cpu", cgroup) == 2
    (cgroup / "cpu.max").write_text("100000 100000\n")   # a 1-CPU quota
    assert physical_cores(tmp_path / "cpu", cgroup) == 1
    assert physical_cores(tmp_path / "nothing", tmp_path / "nothing") == 4     # no /sys: logical CPUs


def test_set_only_on_the_cpu(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("NIYAMA_CPU_THREADS", "1")
    try:
        assert set_cpu_threads("cuda:0") is None and torch.get_num_threads() == before
        assert set_cpu_threads(torch.device("cpu")) == (1, "NIYAMA_CPU_THREADS=1") and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
