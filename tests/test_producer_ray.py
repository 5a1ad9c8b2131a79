"""The producer on a real local Ray (one session shared by the module): end to end into a cache the
consumer's loader reads, a re-run that skips committed work, actors killed mid-shard, and bad input; and
the ways a run fails loudly and once: encoder actors that cannot start, a full disk, an input that ends
early or changed since its commit, a work unit another producer committed first.

Kept small for 2 cores: fractional CPUs per actor, 2 synthetic shards x 8 samples, tiny encoders.
"""
import json
import os
import shutil
from collections import Counter

import pytest
import torch

from megatron_qwen_image.cache import BucketedLoader, CacheReader, CacheWriter
from megatron_qwen_image.cache.exclusions import read_exclusions
from megatron_qwen_image.cache.maintenance import cleanup
from megatron_qwen_image.cache.manifest import ManifestLog, list_snapshots
from megatron_qwen_image.encoders.make_tiny import ensure_tiny
from producer.__main__ import main
from producer.config import load_config
from producer.errors import root_cause
from producer import pipeline
from producer.pipeline import init_ray, run_producer
from producer.report import format_table
from producer.synthetic import generate_shards
from tests.test_producer_badinput import BAD_INPUT_OVERRIDES, build_bad_inputs
from tests.test_producer_dedup import all_keys

pytestmark = pytest.mark.slow

PER_SHARD = 8


@pytest.fixture(scope="module")
def ray_session():
    import ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny():
    return ensure_tiny()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    generate_shards(str(d), num_shards=2, per_shard=PER_SHARD, seed=11)
    return str(d)


def _cfg(tiny, *extra):
    return load_config("configs/producer/default.yaml", [
        f"encoders.dir={tiny}", "pools.cpu_actors=2", "pools.encoder_actors=1", "pools.cpu_actor_num_cpus=0.25",
        "pools.encoder_num_cpus=0.5", "pools.chunk_size=2", "pools.max_chunks_in_flight=1",
        "pools.max_shard_attempts=4", "progress_interval_s=2", *extra])


def _shown(report: dict) -> str:
    """The run's report, for an assertion message (the failures and retries are in it)."""
    return json.dumps(report, indent=1, default=str)[-6000:]


def _records(cache):
    return list(CacheReader(cache).iter_records())


@pytest.fixture(scope="module")
def clean_run(ray_session, tiny, shards, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache_clean"))
    in_flight = []

    def watch(kind, run, job, payload):  # chunks between the stages, per shard, at every event
        if job is not None:
            in_flight.append(len(job.pending))

    report = run_producer(_cfg(tiny), [shards], cache, report_path=os.path.join(cache, "reports", "run.json"),
                          on_event=watch)
    report["max_in_flight_seen"] = max(in_flight)
    return cache, report


def test_end_to_end_cache_is_read_by_the_loader(clean_run):
    cache, report = clean_run
    assert report["shards"] == {"total": 2, "committed": 2, "skipped_already_committed": 0, "changed_since_commit": 0,
                                "discarded_committed_elsewhere": 0, "failed": 0, "retried_attempts": 0,
                                "not_finished": 0}
    assert report["stopped"] is None
    assert report["samples"] == {"seen": 2 * PER_SHARD, "written": 2 * PER_SHARD, "dropped": 0}
    assert report["max_in_flight_seen"] <= 1  # pools.max_chunks_in_flight: memory stays bounded
    assert sum(report["buckets"].values()) == 2 * PER_SHARD
    assert os.path.isfile(os.path.join(cache, "reports", "run.json"))
    assert "bucket (w x h)" in open(os.path.join(cache, "reports", "run.txt")).read()
    recs = _records(cache)
    assert sorted(r["key"] for r in recs) == sorted(f"{s:05d}{i:04d}" for s in range(2) for i in range(PER_SHARD))
    hist = Counter(f"{r['meta']['bucket'][0]}x{r['meta']['bucket'][1]}" for r in recs)
    assert hist == Counter(report["buckets"])
    for r in recs:
        bw, bh = r["meta"]["bucket"]
        assert tuple(r["latent"].shape) == (16, bh // 8, bw // 8)
        assert r["text_embed"].shape == (r["text_len"], 64)
    assert CacheReader(cache).verify_all()["bad"] == []
    loader = BucketedLoader(cache, global_batch_size=2, seed=0, prefetch=0)
    seen = set()
    for _, batch in zip(range(6), loader):
        assert batch["latents"].shape[0] == 2 and batch["latents"].shape[1] == 16
        assert batch["text_embeds"].shape[-1] == 64
        assert batch["text_mask"].sum(1).tolist() == [int(m.sum()) for m in batch["text_mask"]]
        seen.update(batch["keys"])
    assert seen and seen <= {r["key"] for r in recs}


def test_rerun_skips_committed_work_units(clean_run, tiny, shards, monkeypatch):
    cache, _ = clean_run
    entries = len(os.listdir(os.path.join(cache, "manifest")))
    assert list_snapshots(cache) == []  # the first run's 2 entries are below COMPACT_AFTER_ENTRIES
    monkeypatch.setattr(pipeline, "COMPACT_AFTER_ENTRIES", entries)
    report = run_producer(_cfg(tiny), [shards], cache)
    assert report["shards"]["skipped_already_committed"] == 2 and report["shards"]["committed"] == 0
    assert report["samples"]["written"] == 0
    assert len(os.listdir(os.path.join(cache, "manifest"))) == entries
    assert len(_records(cache)) == 2 * PER_SHARD
    # With the threshold reached, the run ended with a manifest snapshot that readers start from.
    assert list_snapshots(cache) == [entries]
    log = ManifestLog(cache)
    log.refresh()
    assert log.from_snapshot == entries and log.live_shards() == CacheReader(cache).shards()


def test_the_same_inputs_for_another_bucket_family_are_work_units_of_their_own(clean_run, tiny, shards, tmp_path):
    """A joint 640p + 1328p stage's cache: one cache, the same inputs produced for two families."""
    cache = str(tmp_path / "two_families")
    shutil.copytree(clean_run[0], cache)
    report = run_producer(_cfg(tiny, "base_resolution=640"), [shards], cache)
    assert report["shards"]["committed"] == 2 and report["samples"]["written"] == 2 * PER_SHARD, _shown(report)
    units = [e.work_unit for e in CacheReader(cache).log.entries]
    assert sorted(u.rsplit("@", 1)[1] for u in units) == ["256", "256", "640", "640"]
    assert sorted(all_keys(cache, base_resolution=640)) == sorted(all_keys(cache, base_resolution=256))


def test_killed_actors_redo_their_shard_without_loss_or_duplicates(clean_run, ray_session, tiny, shards, tmp_path):
    """Kill a CPU actor mid-shard, then an encoder actor holding an open writer; Ray restarts both and the
    shards are redone. The cache then holds exactly the clean run's samples, bit for bit."""
    ray = ray_session
    cache = str(tmp_path / "cache_fault")
    killed = []

    def chaos(kind, run, job, payload):
        if kind != "chunk_done":
            return
        if not killed:
            ray.kill(job.cpu, no_restart=False)  # its generator is mid-shard (back-pressure holds it)
            killed.append(("cpu", job.spec.work_unit))
        elif len(killed) == 1 and run.out.retries >= 1:
            ray.kill(job.enc, no_restart=False)  # holds this shard's uncommitted writer
            killed.append(("encoder", job.spec.work_unit))

    report = run_producer(_cfg(tiny), [shards], cache, on_event=chaos)
    assert [k for k, _ in killed] == ["cpu", "encoder"], _shown(report)
    assert report["shards"]["failed"] == 0 and report["shards"]["committed"] == 2, _shown(report)
    assert report["shards"]["retried_attempts"] >= 2, _shown(report)
    clean = {r["key"]: r for r in _records(clean_run[0])}
    faulty = _records(cache)
    keys = [r["key"] for r in faulty]
    assert len(keys) == len(set(keys)), "duplicated samples"
    assert set(keys) == set(clean)
    for r in faulty:
        assert torch.equal(r["latent"], clean[r["key"]]["latent"])
        assert torch.equal(r["text_embed"], clean[r["key"]]["text_embed"])
    assert CacheReader(cache).verify_all()["bad"] == []
    assert os.listdir(os.path.join(cache, "_tmp")) == [], "temp files of killed attempts were left behind"


def test_bad_input_dropped_and_counted_without_crash(ray_session, tiny, tmp_path):
    """With the CPU pool autoscaling between 1 and 2 actors. Whether it reaches 2 depends on how fast the
    actors are (the decisions are tested state by state in test_producer_autoscale.py); what holds at any
    speed is asserted here: the bounds, the drops, the kept keys, and no writes outside the cache."""
    raw = tmp_path / "raw"
    expected = build_bad_inputs(str(raw))
    cache = tmp_path / "cache"

    def snapshot():
        return sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs
                      if not os.path.join(d, f).startswith(str(cache)))

    before = snapshot()
    # cut.tar ends early: committing its complete samples is what commit_partial_units=true asks for.
    report = run_producer(_cfg(tiny, *BAD_INPUT_OVERRIDES, "sources.commit_partial_units=true", "pools.cpu_actors=1:2",
                               "pools.cpu_shards_per_actor=1", "pools.scale_interval_s=0.5"),
                          [str(raw)], str(cache))
    assert report["run"]["cpu_actors"] == [1, 2] and 1 <= report["run"]["peak_actors"]["cpu"] <= 2, _shown(report)
    assert report["shards"]["failed"] == 0 and report["shards"]["retried_attempts"] == 0, \
        "an actor crashed: " + _shown(report)
    assert report["drops"] == dict(expected["drops"])
    assert report["transforms"] == {"exif_rotated": 1}
    assert sorted(r["key"] for r in _records(str(cache))) == expected["kept"]
    assert snapshot() == before, "the producer wrote outside its cache directory"
    assert not os.path.exists("/abs/evil.jpg") and not os.path.exists(tmp_path / "escape.txt")


def _main(tiny, inputs, cache, report, *extra) -> tuple[int, dict]:
    """`python -m producer` in this process (it joins the module's Ray session); its exit status and report."""
    args = ["--config", "configs/producer/default.yaml", "--encoders", tiny, "--input", inputs, "--cache-dir", cache,
            "--report", report, "pools.cpu_actors=2", "pools.encoder_actors=1", "pools.cpu_actor_num_cpus=0.25",
            "pools.encoder_num_cpus=0.5", "pools.chunk_size=4", "progress_interval_s=30", *extra]
    rc = main(args)
    with open(report) as f:
        return rc, json.load(f)


@pytest.mark.timeout(240)  # the old pool replaced encoders that die in their constructor forever
def test_encoder_actors_that_cannot_start_stop_the_run_with_their_error(ray_session, tiny, shards, tmp_path, capsys,
                                                                          caplog):
    """Every file is where check_encoders_dir looks, but the VAE's config.json is not JSON: each encoder actor
    dies in its constructor. After pools.max_actor_start_failures (3) in a row the run stops: exit 1, one
    line with the actor's root cause, the full text in the JSON report."""
    bad = tmp_path / "encoders"
    for part in ("text_encoder", "tokenizer", "vae"):
        shutil.copytree(os.path.join(tiny, part), bad / part)
    (bad / "vae" / "config.json").write_text("{ this is not JSON")
    rc, report = _main(str(bad), shards, str(tmp_path / "cache"), str(tmp_path / "run.json"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    stopped = report["stopped"]
    assert stopped["reason"] == "actor_start_failures" and stopped["pool"] == "encoder"
    assert err[-1] == f"error: {stopped['message']}"
    assert err[-1].startswith("error: encoder actors failed to start 3 times in a row")
    assert "config.json" in stopped["root_cause"] and err[-1].endswith(stopped["root_cause"])
    assert "Traceback" not in err[-1] and "__init__" in stopped["error"]  # the JSON keeps the whole text
    starts = [r.getMessage() for r in caplog.records if "start failure" in r.getMessage()]
    assert len(starts) == 2 and "start failure 2 of 3" in starts[-1], starts
    assert report["shards"]["committed"] == 0 and report["shards"]["not_finished"] == 2


def test_a_full_disk_is_reported_with_its_cause(ray_session, tiny, shards, tmp_path, caplog):
    """OSError 28 raised a few calls deep in the encoder actor (a model filter that writes): the console, the
    table (and the .txt report) and the JSON's root_cause end with it; the JSON error keeps the traceback."""
    report_path = str(tmp_path / "run.json")
    report = run_producer(_cfg(tiny, "pools.max_shard_attempts=1", "model_filters=[{type: "
                               "'tests.test_producer_model_filters:DiskFullFilter', options: {max_score: 1}}]"),
                          [shards], str(tmp_path / "cache"), report_path=report_path)
    enospc = "OSError: [Errno 28] No space left on device"
    assert report["shards"]["failed"] == 2 and report["shards"]["committed"] == 0
    for f in report["failed_shards"]:
        assert f["root_cause"] == enospc, f
        assert len(f["error"]) > 500 and f["error"].rstrip().endswith(enospc) and "_flush" in f["error"]
        assert root_cause(f["error"]) == enospc
        line = f"FAILED {f['work_unit']} after 1 attempts: {enospc}"
        assert line in format_table(report).splitlines()
        assert line in open(os.path.splitext(report_path)[0] + ".txt").read().splitlines()
    warnings = [r.getMessage() for r in caplog.records if "attempt 0 failed" in r.getMessage()]
    assert len(warnings) == 2 and all(w.endswith(enospc) for w in warnings), warnings
    # The helper on other texts: a chained traceback (the last exception counts), Ray's colour codes, no frames.
    chained = ("Traceback (most recent call last):\n  File \"a.py\", line 1, in f\n    g()\nKeyError: 'x'\n\n"
               "During handling of the above exception, another exception occurred:\n\nTraceback (most recent "
               "call last):\n  File \"a.py\", line 3, in f\n    raise ValueError('y')\nValueError: y\n  more\n")
    assert root_cause(chained) == "ValueError: y"
    assert root_cause("\x1b[36mray::A.f()\x1b[39m (pid=1)\n  File \"x\", line 1\nStaleAttempt: chunk 2") == \
        "StaleAttempt: chunk 2"
    assert root_cause(RuntimeError("The actor died unexpectedly.\n\tpid: 12")) == \
        "RuntimeError: The actor died unexpectedly."


@pytest.mark.timeout(400)
def test_an_input_that_ends_early_is_not_committed_and_a_changed_one_is_found(ray_session, tiny, tmp_path, capsys,
                                                                             caplog):
    """A truncated tar fails its shard once (not retried, exit 1) and commits nothing; the whole file is then
    committed with all its samples. Replaced by another file, the input is reported changed (and kept);
    --redo-changed commits it as the work unit's next version and the exclusion list leaves out the old
    version's samples, so a loader reads each key once, the new bytes."""
    whole = generate_shards(str(tmp_path / "gen_a"), num_shards=1, per_shard=PER_SHARD, seed=21)[0]
    other = generate_shards(str(tmp_path / "gen_b"), num_shards=1, per_shard=PER_SHARD, seed=22)[0]
    raw, cache = tmp_path / "raw", str(tmp_path / "cache")
    raw.mkdir()
    data = open(whole, "rb").read()
    (raw / "00000.tar").write_bytes(data[: len(data) * 6 // 10])
    run = iter(range(100))

    def produce(*extra):
        return _main(tiny, str(raw), cache, str(tmp_path / f"run{next(run)}.json"), *extra)

    rc, report = produce()
    assert rc == 1 and report["shards"]["failed"] == 1 and report["shards"]["committed"] == 0
    assert report["shards"]["retried_attempts"] == 0
    [failed] = report["failed_shards"]
    assert failed["attempts"] == 1 and failed["root_cause"].startswith("producer.errors.IncompleteShard: "), failed
    assert "ended early (truncated_tar" in failed["root_cause"]
    assert CacheReader(cache).num_samples() == 0
    shutil.copyfile(whole, raw / "00000.tar")  # the download completed
    rc, report = produce()
    written = report["samples"]["written"]
    assert rc == 0 and report["shards"]["committed"] == 1 and written > 0
    [entry] = CacheReader(cache).log.entries
    unit, first = entry.work_unit, {r["key"] for r in CacheReader(cache).iter_records()}
    assert len(first) == written
    shutil.copyfile(other, raw / "00000.tar")  # replaced by another file: the same keys, other images
    caplog.clear()
    rc, report = produce()
    assert rc == 0 and report["shards"]["changed_since_commit"] == 1 and report["shards"]["committed"] == 0
    [changed] = report["changed_work_units"]
    assert changed["work_unit"] == unit and not changed["redone"] and "bytes" in changed["change"], changed
    assert any(f"changed since work unit {unit} was committed" in r.getMessage() for r in caplog.records)
    assert "1 changed since their commit (kept as committed; --redo-changed redoes them)" in capsys.readouterr().out
    rc, report = produce("--redo-changed")
    assert rc == 0 and report["shards"]["committed"] == 1 and report["shards"]["changed_since_commit"] == 1
    reader = CacheReader(cache)
    assert [(e.work_unit, e.supersedes) for e in reader.log.entries] == [(unit, None), (f"{unit}#2", unit)]
    ex = read_exclusions(cache)
    assert ex.info["superseded"] == [unit] and ex.num_samples == written
    old_version, new_version = ({s.path for s in e.shards} for e in reader.log.entries)
    assert set(ex.rows) == old_version  # exactly the old version's shards are left out, all their rows
    assert sorted(all_keys(cache, base_resolution=256)) == sorted(first)  # each key once, from new_version
    assert len(new_version) and not new_version & old_version
    rc, report = produce()  # nothing changed since the redo
    assert rc == 0 and report["shards"]["skipped_already_committed"] == 1
    assert report["shards"]["changed_since_commit"] == 0 and report["skipped_work_units"] == [f"{unit}#2"]


def test_a_unit_another_producer_committed_first_is_discarded_not_counted(ray_session, tiny, shards, tmp_path):
    """While this run works on a shard, another writer commits the same work unit: the report counts it as
    discarded (committed elsewhere), not committed, and this attempt leaves no file behind."""
    cache = str(tmp_path / "cache")
    taken = []

    def other_producer_commits(kind, run, job, payload):
        if kind == "shard_started" and not taken:
            taken.append(job.target.name)
            with CacheWriter(cache, job.target.name, base_resolution=256) as w:
                w.add("other-0", torch.zeros(16, 32, 32), torch.zeros(3, 64))

    report = run_producer(_cfg(tiny), [shards], cache, on_event=other_producer_commits)
    assert report["shards"]["committed"] == 1 and report["shards"]["discarded_committed_elsewhere"] == 1, \
        _shown(report)
    assert report["discarded_work_units"] == taken
    assert "1 committed, 0 skipped (already in the cache), 1 discarded (committed elsewhere), 0 failed" in \
        format_table(report)
    assert report["samples"]["written"] == PER_SHARD  # only what this run committed
    keys = sorted(r["key"] for r in _records(cache))
    assert len(keys) == PER_SHARD + 1 and "other-0" in keys
    assert cleanup(cache, grace_s=0) == {"temp_files": [], "unreferenced_shards": []}
