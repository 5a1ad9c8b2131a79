"""Writers in several processes: a consistent manifest, exactly-once work units, killed writers."""
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_qwen_image.cache import CacheReader, CacheWriter, seal
from megatron_qwen_image.cache import manifest as manifest_mod
from megatron_qwen_image.cache.maintenance import cleanup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unit_samples(unit: int):
    """Deterministic samples of a work unit (the same in every process that processes it)."""
    g = torch.Generator().manual_seed(1000 + unit)
    n = 4 + unit % 5
    for i in range(n):
        hw = (32, 32) if i % 2 else (24, 42)
        yield f"u{unit}-{i}", torch.randn(16, *hw, generator=g), torch.randn(2 + i, 8, generator=g)


def write_units(root, units, barrier=None, outcomes=None):
    """Commit each unit; `outcomes` (a queue) gets (unit, committed by this writer) for each."""
    if barrier is not None:
        barrier.wait()
    for u in units:
        with CacheWriter(root, f"unit-{u}", latent_dtype="fp16", base_resolution=256, max_shard_samples=2) as w:
            for key, lat, txt in unit_samples(u):
                w.add(key, lat, txt, caption=key, source=f"pid{os.getpid()}")
        if outcomes is not None:
            outcomes.put((u, not w.already_committed))


def test_concurrent_writer_processes_give_a_consistent_manifest(tmp_path):
    root = str(tmp_path / "cache")
    nproc = 4
    shared = [100, 101, 102]  # every process tries these: they must land exactly once
    plan = [[p * 10 + k for k in range(3)] + shared for p in range(nproc)]
    # forkserver: torch is imported once (in the server), the writers fork from it clean of threads.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "megatron_qwen_image.cache", "tests.test_cache_writer_processes"])
    barrier, outcomes = ctx.Barrier(nproc), ctx.Queue()
    procs = [ctx.Process(target=write_units, args=(root, units, barrier, outcomes)) for units in plan]
    for p in procs:
        p.start()
    results = [outcomes.get(timeout=240) for _ in range(sum(map(len, plan)))]
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0] * nproc
    # Each unit is reported committed by exactly one writer; the others say committed elsewhere.
    all_units = sorted({u for units in plan for u in units})
    assert sorted(u for u, committed in results if committed) == all_units, results

    names = sorted(os.listdir(os.path.join(root, "manifest")))
    assert names == [f"{i:012d}.json" for i in range(len(names))]  # dense, totally ordered log
    reader = CacheReader(root)
    live = [e for e in reader.log.entries if not e.duplicate]
    assert sorted(e.work_unit for e in live) == sorted(f"unit-{u}" for u in all_units)
    expected = {key: (lat, txt) for u in all_units for key, lat, txt in unit_samples(u)}
    got = list(reader.iter_records())
    assert sorted(r["key"] for r in got) == sorted(expected)  # every sample exactly once
    for r in got:
        lat, txt = expected[r["key"]]
        assert torch.equal(r["latent"], lat.half()) and torch.equal(r["text_embed"], txt.bfloat16())  # text_dtype default bf16
    assert reader.verify_all()["bad"] == []
    assert os.listdir(os.path.join(root, "_tmp")) == []
    assert all(CacheWriter.is_committed(root, f"unit-{u}") for u in all_units)
    # Losing attempts (a duplicate entry, if the race produced one) deleted their own files at once:
    # nothing is left for cleanup, and nothing a reader uses is gone.
    assert cleanup(root, grace_s=0) == {"temp_files": [], "unreferenced_shards": []}
    assert sorted(r["key"] for r in CacheReader(root).iter_records()) == sorted(expected)


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    from megatron_qwen_image.cache import CacheWriter
    w = CacheWriter(sys.argv[1], "unit-killed", flush_bytes=10_000)
    for i in range(6):
        w.add(f"k{i}", torch.randn(16, 32, 32), torch.randn(4, 8))
    w._groups[(256, 256), ()].flush()  # data on disk, in the middle of a shard (bucket 256x256, no conditions)
    print("READY", flush=True)
    time.sleep(600)
""")


def test_writer_killed_mid_shard_leaves_nothing_visible_and_is_cleaned_up(tmp_path):
    root = str(tmp_path / "cache")
    write_units(root, [1])
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, root], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "READY"
        temps = os.listdir(os.path.join(root, "_tmp"))
        assert len(temps) == 1 and os.path.getsize(os.path.join(root, "_tmp", temps[0])) > 0
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    # Nothing of the killed attempt is visible.
    reader = CacheReader(root)
    assert len(reader.log) == 1 and not CacheWriter.is_committed(root, "unit-killed")
    assert sorted(r["key"] for r in reader.iter_records()) == sorted(k for k, _, _ in unit_samples(1))
    # The rerun of the work unit deletes the stale temp file and commits exactly once.
    with CacheWriter(root, "unit-killed") as w:
        assert not os.path.exists(os.path.join(root, "_tmp", temps[0]))
        for i in range(3):
            w.add(f"k{i}", torch.zeros(16, 32, 32), torch.zeros(4, 8))
    keys = [r["key"] for r in CacheReader(root).iter_records()]
    assert sorted(k for k in keys if k.startswith("k")) == ["k0", "k1", "k2"]


def test_crash_between_rename_and_manifest_append_is_invisible(tmp_path, monkeypatch):
    root = str(tmp_path / "cache")

    def crash(*a, **k):
        raise KeyboardInterrupt("killed before the manifest entry")

    monkeypatch.setattr(manifest_mod, "append_entry", crash)
    with pytest.raises(KeyboardInterrupt):
        write_units(root, [2])
    monkeypatch.undo()
    orphans = [f for d in os.listdir(root) if d.startswith("bucket=") for f in os.listdir(os.path.join(root, d))]
    assert orphans, "the shards had been renamed into place"
    assert CacheReader(root).num_samples() == 0 and not CacheWriter.is_committed(root, "unit-2")
    assert cleanup(root, grace_s=3600)["unreferenced_shards"] == []  # too young: could be a live writer
    assert len(cleanup(root, grace_s=0)["unreferenced_shards"]) == len(orphans)
    write_units(root, [2])  # the rerun commits normally
    assert CacheReader(root).num_samples() == len(list(unit_samples(2)))
    seal(root)
