"""The actors' work without Ray: chunking, encoding into the cache, and the stale-attempt guards that make
a restarted encoder unable to commit part of a shard."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_qwen_image.cache import CacheReader, CacheWriter
from megatron_qwen_image.encoders.text import QwenTextEncoder
from megatron_qwen_image.encoders.vae import QwenVAEEncoder
from megatron_qwen_image.encoders.make_tiny import ensure_tiny
from producer.config import load_config
import producer.sources as sources
from producer.sources import SourceOptions, discover_shards
from producer.synthetic import generate_shards
from producer.workers import CpuWorker, EncoderWorker, StaleAttempt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tiny = ensure_tiny()
    shards = generate_shards(str(tmp_path_factory.mktemp("syn")), num_shards=1, per_shard=7, seed=3)
    cfg = load_config("configs/producer/default.yaml", [f"encoders.dir={tiny}", "latent_dtype=fp32"])
    return cfg, discover_shards(shards)[0], tiny


def test_cpu_worker_chunks_a_shard_in_order(setup):
    cfg, spec, _ = setup
    chunks = list(CpuWorker(cfg).process_shard(spec, chunk_size=3))
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [c.seen for c in chunks] == [3, 3, 1]
    assert [s.key for c in chunks for s in c.samples] == [f"00000{i:04d}" for i in range(7)]


def test_cpu_worker_fails_a_shard_that_ends_early_unless_partial_units_are_committed(setup, tmp_path):
    from producer.errors import IncompleteShard

    cfg, spec, tiny = setup
    data = open(spec.path, "rb").read()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    [cut] = discover_shards([str(tmp_path / "cut.tar")])
    chunks = []
    with pytest.raises(IncompleteShard, match=r"cut.tar ended early \(truncated_tar: .*sources.commit_partial_units"):
        for c in CpuWorker(cfg).process_shard(cut, chunk_size=2):
            chunks.append(c)
    assert chunks  # the complete samples went out first; the attempt fails at the end of the shard
    partial = load_config("configs/producer/default.yaml", [f"encoders.dir={tiny}", "sources.commit_partial_units=true"])
    kept = list(CpuWorker(partial).process_shard(cut, chunk_size=2))
    assert sum(c.drops.get("truncated_tar", 0) for c in kept) == 1
    assert [s.key for c in kept for s in c.samples][: sum(len(c.samples) for c in chunks)] == \
        [s.key for c in chunks for s in c.samples]


def test_encoder_worker_writes_what_the_encoders_compute(setup, tmp_path):
    cfg, spec, tiny = setup
    chunks = list(CpuWorker(cfg).process_shard(spec, chunk_size=4))
    enc = EncoderWorker(cfg, str(tmp_path))
    stats = [enc.add_chunk(spec.work_unit, 0, c) for c in chunks]
    assert sum(s["written"] for s in stats) == 7
    assert enc.commit(spec.work_unit, 0, len(chunks))["num_samples"] == 7
    assert CacheWriter.is_committed(str(tmp_path), spec.work_unit)
    records = {r["key"]: r for r in CacheReader(str(tmp_path)).iter_records()}
    vae, text = QwenVAEEncoder.from_pretrained(tiny), QwenTextEncoder.from_pretrained(tiny)
    for s in (s for c in chunks for s in c.samples):
        rec = records[s.key]
        z = vae.encode([Image.fromarray(s.image)])[0]
        torch.testing.assert_close(rec["latent"].float(), z, rtol=1e-5, atol=1e-5)
        (t,) = text.encode([s.caption])
        assert rec["text_len"] == t.shape[0]
        torch.testing.assert_close(rec["text_embed"].float(), t.to(torch.bfloat16).float())  # stored as bf16
        assert rec["caption"] == s.caption and rec["meta"]["bucket"] == [s.image.shape[1], s.image.shape[0]]


def test_restarted_encoder_cannot_commit_part_of_a_shard(setup, tmp_path):
    cfg, spec, _ = setup
    chunks = list(CpuWorker(cfg).process_shard(spec, chunk_size=3))
    enc = EncoderWorker(cfg, str(tmp_path))
    enc.add_chunk(spec.work_unit, 0, chunks[0])
    fresh = EncoderWorker(cfg, str(tmp_path))  # what a restarted actor looks like: no writers
    with pytest.raises(StaleAttempt, match="no writer"):
        fresh.add_chunk(spec.work_unit, 0, chunks[1])
    with pytest.raises(StaleAttempt, match="expected chunk 1, got 2"):
        enc.add_chunk(spec.work_unit, 0, chunks[2])
    with pytest.raises(StaleAttempt, match="cannot commit"):
        enc.commit(spec.work_unit, 0, 3)
    assert not CacheWriter.is_committed(str(tmp_path), spec.work_unit)
    # A new attempt replaces the old writer on the same actor and commits the whole shard once.
    for c in chunks:
        enc.add_chunk(spec.work_unit, 1, c)
    assert enc.commit(spec.work_unit, 1, len(chunks))["num_samples"] == 7
    assert CacheReader(str(tmp_path)).num_samples() == 7
    # Redoing a committed work unit adds nothing (the writer's idempotence).
    for c in chunks:
        assert enc.add_chunk(spec.work_unit, 2, c)["written"] == 0
    enc.commit(spec.work_unit, 2, len(chunks))
    assert CacheReader(str(tmp_path)).num_samples() == 7


def test_model_filters_run_before_encoding(setup, tmp_path):
    cfg, spec, _ = setup
    chunks = list(CpuWorker(cfg).process_shard(spec, chunk_size=8))
    lengths = sorted(len(s.caption) for s in chunks[0].samples)
    threshold = lengths[3]
    cfg2 = load_config("configs/producer/default.yaml", [
        f"encoders.dir={cfg.encoders.dir}",
        "model_filters=[{type: 'tests.test_producer_model_filters:ConstantFilter', "
        f"options: {{max_score: {threshold}}}}}]"])
    expected = sum(n > threshold for n in lengths)
    assert 0 < expected < 7
    st = EncoderWorker(cfg2, str(tmp_path)).add_chunk(spec.work_unit, 0, chunks[0])
    assert st["drops"] == {"constant": expected} and st["written"] == 7 - expected


@pytest.mark.parametrize("shape", [(1328, 1328, 3), (640, 640, 3), (480, 832, 3), (256, 256, 3)])
def test_prepared_pixels_travel_in_bands_ray_copies_on_its_calling_thread(shape):
    """Ray copies each pickled buffer over 1 MiB with threads it starts for that copy; a sample's pixels
    must reach the object store as buffers of at most 1 MiB and come back bit-exact."""
    import pickle

    from producer.filters import Prepared

    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    sample = Prepared("k", image, "a caption", "src", {"w": shape[1]})
    buffers = []
    data = pickle.dumps(sample, protocol=5, buffer_callback=buffers.append)
    sizes = [memoryview(b).nbytes for b in buffers]
    assert sum(sizes) == image.nbytes and max(sizes) <= 1 << 20, sizes
    back = pickle.loads(data, buffers=buffers)
    assert back.key == "k" and back.caption == "a caption" and back.meta == {"w": shape[1]}
    assert back.image.shape == shape and back.image.dtype == np.uint8 and np.array_equal(back.image, image)


def test_cpu_actors_hold_one_shard_each_near_the_end_of_the_queue():
    from producer.pipeline import shards_per_cpu_actor

    assert shards_per_cpu_actor(queued=10, actors=2, per_actor=2) == 2
    assert shards_per_cpu_actor(queued=3, actors=2, per_actor=2) == 2
    assert [shards_per_cpu_actor(q, 2, 2) for q in (2, 1, 0)] == [1, 1, 1]


def test_shards_are_handed_out_largest_first(tmp_path, monkeypatch):
    """Longest-processing-time-first: the small shards come last, so actors finish close together."""
    from producer.pipeline import largest_first

    for name, size in (("a.tar", 3000), ("b.tar", 9000), ("c.tar", 1000), ("d.tar", 9000)):
        (tmp_path / name).write_bytes(b"\0" * size)
    specs = discover_shards([str(tmp_path / "*.tar")])
    assert [s.input_bytes() for s in specs] == [3000, 9000, 1000, 9000]
    assert [os.path.basename(s.path) for s in largest_first(specs)] == ["b.tar", "d.tar", "a.tar", "c.tar"]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, size in (("x.jpg", 500), ("y.png", 700)):
        (folder / name).write_bytes(b"\0" * size)
        (folder / name.replace(name[-4:], ".txt")).write_text("a caption")
    [spec] = discover_shards([str(folder)])
    assert spec.kind == "folder" and spec.input_bytes() == 1200  # the images, not the sidecars

    # A large folder: each slice's size is estimated from a few evenly spaced images (a handful of stats
    # per shard, not one per image), and the partial last slice sorts after the full ones.
    many = tmp_path / "many"
    many.mkdir()
    for i in range(50):
        (many / f"{i:03d}.jpg").write_bytes(b"\0" * (100 + i % 2))
    full, partial = discover_shards([str(many)], SourceOptions(folder_shard_size=40))
    stats = []
    real_getsize = os.path.getsize
    monkeypatch.setattr(sources.os.path, "getsize", lambda p: stats.append(p) or real_getsize(p))
    assert 40 * 100 <= full.input_bytes() <= 40 * 101 and len(stats) == sources.FOLDER_SIZE_SAMPLES
    assert 10 * 100 <= partial.input_bytes() <= 10 * 101
    assert largest_first([partial, full]) == [full, partial]
