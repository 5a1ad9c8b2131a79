"""Producer memory on growing inputs (issue 4: bounded in-flight work keeps memory flat).

    python -m benchmarks.bench_producer_memory [--per-shard 60] [--scale 4]

The whole producer (1 CPU actor, 1 encoder actor, tiny random encoders, 256p buckets, chunks of 4
samples) runs over 2 input shards of N and then of scale x N photo-like JPEGs. The encoder (the VAE on
one CPU core) is several times slower than decoding, as a large VAE on a busy GPU can be: the case
where the CPU actor could run ahead through a shard and fill memory with decoded images. (A CPU actor
takes no new shard while 2 of its shards are open, so across shards memory is bounded anyway; what
`max_chunks_in_flight` bounds is the inside of a shard, which is why the inputs grow by shard size.) Each run gets a fresh local
Ray; a sampler thread reads the object store's bytes in use (the raylet's own statistics, Ray's
internal `node_stats`) every 0.2 s and keeps the peak. Decoded images reach the encoders only through
the object store, so its peak is the producer's in-flight data.

  bounded    pools.max_chunks_in_flight = 2 (per open shard, plus what Ray's generator back-pressure holds)
  unbounded  max_chunks_in_flight = 100000: the same runs with the bound effectively off

Figures: peak at scale x S / peak at S. Flat memory: about 1 with the bound; without it the peak
follows the input. Writes benchmarks/results/producer_memory.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

from benchmarks.bench_producer import write_tar_shards
from benchmarks.common import environment, print_table, save_results


class ObjectStoreSampler(threading.Thread):
    """Peak of the local raylet's object-store bytes in use, sampled every `interval` s."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        import ray

        node = ray.nodes()[0]
        self.address, self.port = node["NodeManagerAddress"], node["NodeManagerPort"]
        self.interval, self.peak, self.samples = interval, 0, 0
        self.stop = threading.Event()

    def used(self) -> int:
        from ray._private.internal_api import node_stats  # internal, but the raylet's own figure

        return int(node_stats(self.address, self.port, include_memory_info=False).store_stats.object_store_bytes_used)

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.used())
            self.samples += 1
            self.stop.wait(self.interval)


def one_run(inputs: str, tiny: str, max_in_flight: int, workdir: str) -> dict:
    import ray

    from producer.config import load_config
    from producer.pipeline import ProducerRun, init_ray

    cfg = load_config("configs/producer/default.yaml", [
        f"encoders.dir={tiny}", "base_resolution=256", "pools.cpu_actors=1", "pools.encoder_actors=1",
        "pools.chunk_size=4", f"pools.max_chunks_in_flight={max_in_flight}", "progress_interval_s=1000"])
    cache = os.path.join(workdir, f"cache-{max_in_flight}-{os.path.basename(inputs)}")
    init_ray(num_cpus=2)
    sampler = ObjectStoreSampler()
    sampler.start()
    t0 = time.time()
    try:
        report = ProducerRun(cfg, [inputs], cache).run()
        time.sleep(1.5)  # the raylet's statistics lag by about a second
    finally:
        sampler.stop.set()
        sampler.join()
        ray.shutdown()
    return {"samples": report["samples"]["written"], "seconds": round(time.time() - t0, 2),
            "peak_object_store_mib": round(sampler.peak / 2**20, 2), "store_samples": sampler.samples}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-shard", type=int, default=60, help="N: samples per input shard in the small run")
    p.add_argument("--scale", type=int, default=4, help="the large run has shards of scale x N samples")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = repo + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    from megatron_qwen_image.encoders.make_tiny import ensure_tiny

    tiny = ensure_tiny()
    work = tempfile.mkdtemp(prefix="bench_producer_memory_")
    t0 = time.time()
    try:
        small, large = os.path.join(work, "small"), os.path.join(work, "large")
        write_tar_shards(small, 2, args.per_shard, seed=2)
        write_tar_shards(large, 2, args.per_shard * args.scale, seed=3)
        runs = {}
        for mode, limit in (("bounded", 2), ("unbounded", 100_000)):
            for name, path in (("small", small), ("large", large)):
                runs[f"{mode}_{name}"] = r = one_run(path, tiny, limit, work)
                print(f"{mode:>9} {name}: {r['samples']} samples in {r['seconds']} s, object store peak "
                      f"{r['peak_object_store_mib']} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peak = {k: r["peak_object_store_mib"] for k, r in runs.items()}
    ratio = {m: peak[f"{m}_large"] / max(0.01, peak[f"{m}_small"]) for m in ("bounded", "unbounded")}
    n, big = args.per_shard, args.per_shard * args.scale
    print(f"\nProducer in-flight data (object store peak), 2 input shards of {n} vs {big} samples, 256p:")
    print_table(["max_chunks_in_flight", f"{n}/shard MiB", f"{big}/shard MiB", "large / small"],
                [[m, peak[f"{m}_small"], peak[f"{m}_large"], ratio[m]]
                 for m in ("bounded", "unbounded")])
    out = {"runs": runs, "peak_ratio_large_over_small": ratio, "shards": 2, "samples_per_shard_small": n,
           "samples_per_shard_large": big, "chunk_size": 4, "base_resolution": 256,
           "environment": environment(), "wall_s": time.time() - t0,
           "command": "python -m benchmarks.bench_producer_memory " + " ".join(argv or [])}
    print(f"results: {save_results('producer_memory', out)}")
    return out


if __name__ == "__main__":
    main()
