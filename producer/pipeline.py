"""The Ray application: a CPU actor pool and an encoder actor pool, sized independently, joined per shard.

    shard queue ──► CPU actor: process_shard(spec)  (a streaming generator of Chunk refs)
                         │ chunk refs (the driver never fetches image data)
                         ▼
                    encoder actor: add_chunk(work_unit, attempt, chunk) ... commit(work_unit, attempt, n)
                         │
                         ▼
                    latent cache (CacheWriter: one work unit = one input shard, atomic and idempotent)

- Shards go out largest first. Each CPU actor works on one shard at a time; the shard is pinned to one
  encoder actor (the one with the fewest open shards) because a work unit's writer lives there.
- Bounded memory: a shard has at most `pools.max_chunks_in_flight` chunks produced but not yet encoded;
  the generator's back-pressure pauses the CPU actor beyond that.
- Faults: actors are created with `max_restarts`, so Ray restarts a killed actor. The shard it was
  working on fails (its uncommitted temp files are discarded) and is queued again, up to
  `pools.max_shard_attempts` times; the cache writer's idempotence means nothing is lost or duplicated.
  A shard whose input ended early fails at once (`IncompleteShard`: retrying reads the same file).
  Actors that die before they are ready `pools.max_actor_start_failures` times in a row stop the run
  with the last one's error (`ActorStartError`) instead of being replaced forever.
- A run started again on the same inputs skips work units the cache already holds, reports those whose
  input changed since their commit and, with `sources.redo_changed`, redoes them (producer/committed.py).
- Another producer that commits a work unit first makes this run's attempt `discarded (committed
  elsewhere)`; the writer deletes that attempt's files.
- Checked before Ray starts: the config, the encoders directory, the inputs, the cache directory.
  SIGINT/SIGTERM stop the run: it reports what it committed and ends the Ray it started (`ray_session`).
- Pools are either fixed or autoscale between min and max from the queue and the encoder back-log.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import ray

from megatron_qwen_image.cache import CacheFormatError, CacheWriter
from megatron_qwen_image.cache.exclusions import covers, publish_superseded, read_exclusions
from megatron_qwen_image.cache.manifest import ManifestLog, compact, count_entries, ensure_cache_dirs, list_snapshots
from megatron_qwen_image.config import ConfigError
from megatron_qwen_image.encoders.local_dir import EncoderDirError, check_encoders_dir
from producer.autoscale import OpenShard, PoolState, plan_scaling
from producer.committed import fingerprint_record, latest_committed
from producer.config import PoolSize, ProducerConfig
from producer.errors import ActorStartError, IncompleteShard, interrupt_on_signals, interruption_name, root_cause
from producer.report import ProgressReporter, RunStats, ShardOutcomes
from producer.sources import InputError, InputFingerprint, ShardSpec, discover_inputs
from producer.workers import CpuWorker, EncoderWorker

log = logging.getLogger("producer")
COMPACT_AFTER_ENTRIES = 1000  # manifest entries since the newest snapshot that make a run end with a compaction
COMMIT_DRAIN_S = 30.0  # on an interruption, how long commits already sent may take to finish


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Join `address` (a running cluster; also taken from RAY_ADDRESS, as `ray job submit` sets it) or
    start a local Ray; a session already running in this process is reused. True if it started one."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    # Ray 2.60 turns token authentication on by default; a loopback-only local cluster needs none.
    # address="local": always a new instance, never a `ray start` cluster that happens to run here.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # No prestarted task workers: the producer runs only actors, which get workers of their own; idle
    # prestarted ones still take ~0.01 core each, which the CPU actors would otherwise have.
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=True,
             _system_config={"prestart_worker_first_driver": False})
    return True


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Ray for one run (`init_ray`). Meanwhile SIGINT and SIGTERM raise `Interrupted`, which the run turns into
    a report of what it committed. A Ray this started is shut down on the way out, however the run ends:
    otherwise its agents (dashboard, runtime env: ~200 MB) outlive a killed driver by a minute."""
    started = init_ray(address, num_cpus)
    with interrupt_on_signals() as disarm:
        try:
            yield
        finally:
            disarm()  # a shutdown cut short by a signal would leave Ray's processes behind
            if started:
                ray.shutdown()


def check_encoders(encoders_dir: str | None) -> None:
    """ConfigError (key encoders.dir) unless the directory holds every component the actors load: checked
    before Ray starts, because an actor that fails in its constructor is far from the cause."""
    if not encoders_dir:
        raise ConfigError("encoders.dir", "required (a local Qwen-Image repo, or "
                          "`python -m megatron_qwen_image.encoders.make_tiny DIR`); set it or pass --encoders")
    try:
        check_encoders_dir(encoders_dir)
    except EncoderDirError as e:
        raise ConfigError("encoders.dir", str(e)) from None


def open_cache_dir(path: str) -> None:
    """Create the cache's skeleton, or check the cache that is there, before Ray starts: InputError if it
    cannot be used (a file, no permission, another format or version)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"--cache-dir {path!r} is a file, not a directory")
    try:
        ensure_cache_dirs(path)
    except OSError as e:
        raise InputError(f"--cache-dir {path!r} cannot be used: {e.strerror or e}: {e.filename or path}") from None
    except CacheFormatError as e:
        raise InputError(f"--cache-dir {path!r}: {e}") from None


def family_work_unit(input_unit: str, base_resolution: int) -> str:
    """The work unit of an input shard (sources.work_unit_name) in one bucket family: `NAME@640`."""
    return f"{input_unit}@{base_resolution}"


@dataclass(frozen=True)
class UnitTarget:
    """The work-unit name an attempt commits as, and the committed version of it that it replaces (a redo)."""

    name: str
    supersedes: str | None = None


@dataclass
class _Job:
    """One attempt at one shard."""

    spec: ShardSpec
    target: UnitTarget
    attempt: int
    cpu: object
    enc: object
    fingerprint: InputFingerprint  # the input as the attempt began, recorded by its commit
    gen: object = None
    chunks_sent: int = 0
    gen_done: bool = False
    pending: list = field(default_factory=list)
    commit_ref: object = None
    stats: RunStats = field(default_factory=RunStats)
    started: float = field(default_factory=time.time)


@dataclass
class _PeakActors:
    """The most actors each pool had at once (autoscaling shows here)."""
    cpu: int = 0
    encoder: int = 0


def largest_first(specs: list[ShardSpec]) -> list[ShardSpec]:
    """Shards in the order they are handed out: by input bytes, largest first (ties keep their order).
    Shards are indivisible, so a run ends when the actor with the last big shard finishes; with the
    small ones last (longest-processing-time-first), the actors finish close together."""
    return sorted(specs, key=lambda s: -s.input_bytes())


def shards_per_cpu_actor(queued: int, actors: int, per_actor: int) -> int:
    """How many shards one CPU actor may hold. `per_actor` while more shards wait than there are actors
    (the extra one waits in the actor's own queue and starts with no gap); near the end of the queue only
    one, so the last shards go to whichever actor frees first instead of queueing behind another actor's
    shard while this one idles (a shard is indivisible: that wait is the run's end-of-run tail)."""
    return per_actor if queued > actors else 1


class ActorPool:
    """Actors of one kind; an actor is usable once its `ping` (i.e. its __init__) has completed.

    A dead actor is replaced, but `max_start_failures` actors in a row that die before their first successful
    ping raise ActorStartError: a constructor that fails (bad encoder files, no memory) fails every time."""

    def __init__(self, name: str, factory, size: PoolSize, max_start_failures: int):
        self.name, self.factory, self.size = name, factory, size
        self.max_start_failures = max_start_failures
        self.start_failures = 0  # actors in a row that died before they were ready
        self.ever_ready: set[str] = set()  # actor ids; a restarted actor keeps its id
        self.ready: list = []
        self.starting: dict = {}  # ping ref -> actor
        self.probing: dict = {}  # ping ref -> actor, after a failure: restarted (ok) or dead (replace)
        self.load: Counter = Counter()  # actor id -> open shards
        for _ in range(size.min):
            self.spawn()

    @staticmethod
    def aid(actor) -> str:
        return actor._actor_id.hex()

    def spawn(self) -> None:
        actor = self.factory()
        self.starting[actor.ping.remote()] = actor

    def total(self) -> int:
        return len(self.ready) + len(self.starting) + len(self.probing)

    def waitables(self) -> list:
        return list(self.starting) + list(self.probing)

    def on_ready(self, ref) -> bool:
        """Handle a finished ping; returns True if `ref` belonged to this pool."""
        actor = self.starting.pop(ref, None) or self.probing.pop(ref, None)
        if actor is None:
            return False
        aid = self.aid(actor)
        try:
            ray.get(ref)
        except ray.exceptions.ActorDiedError as e:
            never_ready = aid not in self.ever_ready
            self.start_failures += never_ready
            if never_ready and self.start_failures >= self.max_start_failures:
                raise ActorStartError(self.name, self.start_failures, e) from None
            log.warning("%s actor %s is dead (%s); starting a replacement%s", self.name, aid[:8], root_cause(e),
                        f" (start failure {self.start_failures} of {self.max_start_failures})" if never_ready else "")
            self.spawn()
        except ray.exceptions.RayError:
            self.probing[actor.ping.remote()] = actor  # still restarting: ask again
        else:
            self.ready.append(actor)
            self.ever_ready.add(aid)
            self.start_failures = 0
        return True

    def suspect(self, actor) -> None:
        """A call to `actor` failed: take it out of service until a ping shows it restarted."""
        if actor in self.ready:
            self.ready.remove(actor)
            self.probing[actor.ping.remote()] = actor

    def least_loaded(self):
        return min(self.ready, key=lambda a: self.load[self.aid(a)]) if self.ready else None

    def state(self) -> PoolState:
        return PoolState(tuple(self.aid(a) for a in self.ready), len(self.starting), len(self.probing), self.size)

    def retire(self, actor_ids) -> None:
        """Stop the ready actors with these ids (autoscaling down)."""
        for actor in [a for a in self.ready if self.aid(a) in set(actor_ids)]:
            self.ready.remove(actor)
            ray.kill(actor, no_restart=True)

    def shutdown(self) -> None:
        for a in self.ready + list(self.starting.values()) + list(self.probing.values()):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.ready, self.starting, self.probing = [], {}, {}


class ProducerRun:
    """One producer run over `inputs` into `cache_dir`. Call `run()`; it returns the final report dict."""

    def __init__(self, cfg: ProducerConfig, inputs: list[str], cache_dir: str, report_path: str | None = None,
                 on_event=None):
        """Checks everything it can before Ray starts: ConfigError for the encoders directory, InputError for
        the inputs and the cache directory."""
        self.cfg, self.inputs, self.cache_dir = cfg, inputs, os.path.abspath(cache_dir)
        self.report_path = report_path
        self.on_event = on_event  # test/ops hook: on_event(kind, run, job, payload)
        check_encoders(cfg.encoders.dir)
        # A work unit is one input shard encoded into one bucket family: the same inputs produced for another
        # family into the same cache (a joint 640p + 1328p stage's) are units of their own, not committed ones.
        self.detected = discover_inputs(inputs, cfg.sources)
        for d in self.detected:
            log.info("%s", d.line())
        self.specs = [replace(s, work_unit=family_work_unit(s.work_unit, cfg.base_resolution))
                      for d in self.detected for s in d.shards]
        open_cache_dir(self.cache_dir)
        self.stats = RunStats()
        self.out = ShardOutcomes(len(self.specs))
        self._log: ManifestLog | None = None  # read when superseded versions must be excluded
        self._last_scale = float("-inf")
        self.clock = time.monotonic  # autoscaling's interval; replaceable (tests)
        self.peak = _PeakActors()

    # ------------------------------------------------------------------ actors
    def _make_pools(self) -> None:
        p = self.cfg.pools
        gpus = p.encoder_num_gpus
        if gpus == "auto":
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        # max_task_retries=0: a failed call fails its shard, which is redone as a whole (a retried chunk on
        # a restarted encoder would have lost the writer state of the chunks before it).
        cpu_cls = ray.remote(num_cpus=p.cpu_actor_num_cpus, max_restarts=p.max_restarts, max_task_retries=0)(CpuWorker)
        enc_cls = ray.remote(num_cpus=p.encoder_num_cpus, num_gpus=gpus, max_restarts=p.max_restarts,
                             max_task_retries=0)(EncoderWorker)
        cfg, cache_dir = self.cfg, self.cache_dir
        self.cpu_pool = ActorPool("cpu", lambda: cpu_cls.remote(cfg), p.cpu_actors, p.max_actor_start_failures)
        self.enc_pool = ActorPool("encoder", lambda: enc_cls.remote(cfg, cache_dir), p.encoder_actors,
                                  p.max_actor_start_failures)

    def _autoscale(self, queue: deque, active: dict) -> None:
        """Carry out `plan_scaling` on a snapshot of the queue, the open shards and the pools, at most
        every `pools.scale_interval_s` seconds."""
        now = self.clock()
        if now - self._last_scale < self.cfg.pools.scale_interval_s:
            return
        self._last_scale = now
        shards = [OpenShard(ActorPool.aid(j.cpu), ActorPool.aid(j.enc), len(j.pending), j.gen_done)
                  for j in active.values()]
        plan = plan_scaling(len(queue), shards, self.cpu_pool.state(), self.enc_pool.state(),
                            self.cfg.pools.max_chunks_in_flight)
        for reason in plan.reasons:
            log.info("%s", reason)
        if plan.grow_cpu:
            self.cpu_pool.spawn()
        if plan.grow_encoder:
            self.enc_pool.spawn()
        self.cpu_pool.retire(plan.retire_cpu)
        self.enc_pool.retire(plan.retire_encoder)

    # ------------------------------------------------------------------ shard jobs
    def _start(self, spec: ShardSpec, target: UnitTarget, attempt: int, cpu, enc) -> _Job:
        job = _Job(spec, target, attempt, cpu, enc, spec.fingerprint())
        job.gen = cpu.process_shard.options(
            num_returns="streaming", _generator_backpressure_num_objects=self.cfg.pools.max_chunks_in_flight
        ).remote(spec, self.cfg.pools.chunk_size)
        self.enc_pool.load[ActorPool.aid(enc)] += 1
        return job

    def _release(self, job: _Job) -> None:
        self.enc_pool.load[ActorPool.aid(job.enc)] -= 1

    def _fail(self, job: _Job, error: BaseException, queue: deque) -> None:
        name, cause = job.target.name, root_cause(error)
        log.warning("shard %s attempt %d failed: %s", name, job.attempt, cause)
        self._release(job)
        try:
            ray.cancel(job.gen)
        except Exception:  # the generator may be gone already
            pass
        # Either actor may have died (an error travels from the CPU actor through the chunk argument into
        # the encoder call): both leave service until a ping shows they are alive or restarted.
        self.cpu_pool.suspect(job.cpu)
        self.enc_pool.suspect(job.enc)
        job.enc.abort.remote(name)  # best effort; a restarted actor has nothing to abort
        if CacheWriter.is_committed(self.cache_dir, name):
            # The commit landed but its reply was lost (the actor died right after): the shard is done.
            self._committed(job, None)
            return
        # An input that ended early ends early again: no retry in this run; the next run tries it.
        if not isinstance(error, IncompleteShard) and job.attempt + 1 < self.cfg.pools.max_shard_attempts:
            self.out.retries += 1
            queue.appendleft((job.spec, job.target, job.attempt + 1))
        else:
            self.out.failed.append({"work_unit": name, "path": job.spec.path, "attempts": job.attempt + 1,
                                    "root_cause": cause, "error": str(error) or type(error).__name__})
        self._event("shard_failed", job, error)

    def _committed(self, job: _Job, result: dict | None) -> None:
        """The commit call returned `result`, or (None) its reply was lost but the cache holds the unit."""
        name = job.target.name
        if result is not None and result["committed_elsewhere"]:
            # Its samples are counted by the producer whose commit won, not here.
            self.out.discarded.append(name)
            log.warning("work unit %s was committed by another producer meanwhile; this attempt was discarded "
                        "and its files deleted", name)
            self._event("shard_discarded", job, result)
            return
        job.stats.shards_committed += 1
        self.stats.merge(job.stats)
        if result is not None:
            log.info("committed %s: %d samples in %d cache shards (%.1fs)", name, result["num_samples"],
                     result["shards"], time.time() - job.started)
        if job.target.supersedes:
            self._exclude_superseded()
        self._event("shard_committed", job, result)

    def _exclude_superseded(self) -> None:
        """Make the cache's exclusion list cover every superseded version: after a redo's commit, and at the
        start when an earlier run stopped between such a commit and this."""
        if self._log is None:
            self._log = ManifestLog(self.cache_dir)
        try:
            number = publish_superseded(self.cache_dir, self._log)
        except OSError as e:
            log.error("could not publish the exclusion list of superseded work units (%s); the next run will",
                      root_cause(e))
            return
        if number is not None:
            log.info("published exclusion list %d: it leaves out the samples of superseded work-unit versions",
                     number)

    def _plan(self) -> deque:
        """The shards to do, largest first, as (spec, target, attempt): those not committed yet, and those whose
        input changed since their commit if sources.redo_changed. Every other shard is counted in `self.out`."""
        queue: deque = deque()
        older: set[str] = set()
        for spec in largest_first(self.specs):
            latest = latest_committed(self.cache_dir, spec.work_unit)
            if latest is None:
                queue.append((spec, UnitTarget(spec.work_unit), 0))
                continue
            older.update(latest.older_versions())
            change = latest.change(spec.fingerprint())
            if change is None:
                self.out.skipped.append(latest.name)
                continue
            redo = self.cfg.sources.redo_changed
            self.out.changed.append({"work_unit": latest.name, "path": spec.path, "change": change, "redone": redo})
            if redo:
                log.warning("input %s changed since work unit %s was committed (%s): redoing it as %s", spec.path,
                            latest.name, change, latest.next_version())
                queue.append((spec, UnitTarget(latest.next_version(), latest.name), 0))
            else:
                log.warning("input %s changed since work unit %s was committed (%s): kept the committed version "
                            "(--redo-changed redoes it)", spec.path, latest.name, change)
        if older and not covers(read_exclusions(self.cache_dir), older):
            self._exclude_superseded()
        return queue

    def _event(self, kind: str, job=None, payload=None) -> None:
        if self.on_event is not None:
            self.on_event(kind, self, job, payload)

    def run(self) -> dict:
        t0 = time.time()
        queue = self._plan()
        reporter = ProgressReporter(len(self.specs), self.out.not_to_do(), self.cfg.progress_interval_s)
        log.info("producer: %d shards (%d already committed, %d changed since), cache %s", len(self.specs),
                 len(self.out.skipped), len(self.out.changed), self.cache_dir)
        active: dict[str, _Job] = {}
        stopped = None
        try:
            if queue:
                self._make_pools()
            while queue or active:
                self._schedule(queue, active)
                waitables, owners = self._waitables(active)
                if not waitables:
                    time.sleep(0.05)
                    continue
                ready, _ = ray.wait(waitables, num_returns=1, timeout=0.5, fetch_local=False)
                if ready:  # take everything else that is ready too, in one pass
                    ready, _ = ray.wait(waitables, num_returns=len(waitables), timeout=0, fetch_local=False)
                for ref in ready:
                    self._handle(ref, owners.get(ref), queue, active)
                if not self.cfg.pools.cpu_actors.fixed or not self.cfg.pools.encoder_actors.fixed:
                    self._autoscale(queue, active)
                self.peak.cpu = max(self.peak.cpu, self.cpu_pool.total())
                self.peak.encoder = max(self.peak.encoder, self.enc_pool.total())
                reporter.maybe_print(self._live_stats(active), len(active), len(self.out.failed), self.out.retries)
        except ActorStartError as e:
            stopped = {"reason": "actor_start_failures", "pool": e.pool, "message": str(e),
                       "root_cause": root_cause(e.error), "error": str(e.error)}
        except KeyboardInterrupt as e:  # SIGINT, or Interrupted (SIGINT/SIGTERM inside ray_session)
            name = interruption_name(e)
            stopped = {"reason": "interrupted", "signal": name, "message": f"interrupted by {name}"}
            self._finish_commits_in_flight(active)
        finally:
            for pool in ("cpu_pool", "enc_pool"):
                if hasattr(self, pool):
                    getattr(self, pool).shutdown()
        if stopped:
            log.error("producer stopped: %s", stopped["message"])
        elapsed = time.time() - t0
        report = reporter.final(self.stats, elapsed, self._run_info(), self.out, stopped, self.cfg.filters)
        if self.report_path:
            reporter.write(report, self.report_path)
        self._compact_manifest()
        return report

    def _compact_manifest(self) -> None:
        """Snapshot the manifest once COMPACT_AFTER_ENTRIES entries have piled up since the newest snapshot, so
        that trainers open a big cache with one large read (docs/cache_format.md, Snapshots). Safe while other
        producers write; a failure only costs readers speed, so it is logged, never raised."""
        try:
            tail = count_entries(self.cache_dir) - max(list_snapshots(self.cache_dir), default=0)
            if tail >= COMPACT_AFTER_ENTRIES:
                c = compact(self.cache_dir)
                log.info("manifest snapshot of %d entries: %s", c.num_entries, c.path)
        except (OSError, CacheFormatError, ValueError) as e:
            log.warning("manifest compaction skipped (readers read the entries instead): %s", e)

    def _finish_commits_in_flight(self, active: dict, timeout_s: float = COMMIT_DRAIN_S) -> None:
        """On an interruption: let the commits already sent finish (they take milliseconds) before the actors
        are stopped, so that what this run reports as committed is what the cache holds. A commit still
        running after `timeout_s` is counted if the cache holds its unit (its reply may be lost)."""
        jobs = {j.commit_ref: (key, j) for key, j in active.items() if j.commit_ref is not None}
        if not jobs:
            return
        done, _ = ray.wait(list(jobs), num_returns=len(jobs), timeout=timeout_s, fetch_local=False)
        for ref, (key, job) in jobs.items():
            try:
                result = ray.get(ref) if ref in done else None
            except ray.exceptions.RayError:
                result = None
            if result is not None or CacheWriter.is_committed(self.cache_dir, job.target.name):
                del active[key]
                self._committed(job, result)

    def _run_info(self) -> dict:
        p = self.cfg.pools
        return {"inputs": self.inputs, "cache_dir": self.cache_dir, "base_resolution": self.cfg.base_resolution,
                "latent_dtype": self.cfg.latent_dtype, "ray_address": ray.get_runtime_context().gcs_address,
                "cpu_actors": [p.cpu_actors.min, p.cpu_actors.max],
                "encoder_actors": [p.encoder_actors.min, p.encoder_actors.max],
                "peak_actors": asdict(self.peak), "chunk_size": p.chunk_size,
                "max_chunks_in_flight": p.max_chunks_in_flight, "redo_changed": self.cfg.sources.redo_changed,
                "commit_partial_units": self.cfg.sources.commit_partial_units}

    def _live_stats(self, active) -> RunStats:
        live = RunStats()
        live.merge(self.stats)
        for j in active.values():
            live.merge(j.stats)
        return live

    def _schedule(self, queue: deque, active: dict) -> None:
        """Give queued shards to CPU actors with fewer than `cpu_shards_per_actor` shards (the least busy
        first; one each near the end of the queue, see `shards_per_cpu_actor`). A second shard waits in the
        actor's own queue and starts the moment the first one ends, so the actor never idles while the
        driver notices the end and submits the next."""
        busy = Counter(ActorPool.aid(j.cpu) for j in active.values())
        while queue:
            limit = shards_per_cpu_actor(len(queue), len(self.cpu_pool.ready), self.cfg.pools.cpu_shards_per_actor)
            free = [a for a in self.cpu_pool.ready if busy[ActorPool.aid(a)] < limit]
            enc = self.enc_pool.least_loaded()
            if not free or enc is None:
                return
            cpu = min(free, key=lambda a: busy[ActorPool.aid(a)])
            spec, target, attempt = queue.popleft()
            active[spec.work_unit] = self._start(spec, target, attempt, cpu, enc)
            busy[ActorPool.aid(cpu)] += 1
            self._event("shard_started", active[spec.work_unit])

    def _waitables(self, active: dict):
        owners, refs = {}, []
        for pool in (self.cpu_pool, self.enc_pool):
            refs.extend(pool.waitables())
        for j in active.values():
            if not j.gen_done and len(j.pending) < self.cfg.pools.max_chunks_in_flight:
                refs.append(j.gen)
                owners[j.gen] = (j, "gen")
            for r in j.pending:
                refs.append(r)
                owners[r] = (j, "chunk")
            if j.commit_ref is not None:
                refs.append(j.commit_ref)
                owners[j.commit_ref] = (j, "commit")
        return refs, owners

    def _handle(self, ref, owner, queue: deque, active: dict) -> None:
        if owner is None:
            self.cpu_pool.on_ready(ref) or self.enc_pool.on_ready(ref)
            return
        job, kind = owner
        wu, name = job.spec.work_unit, job.target.name
        if active.get(wu) is not job:  # this attempt already failed earlier in the same pass
            return
        try:
            if kind == "gen":
                try:
                    chunk_ref = next(job.gen)
                except StopIteration:
                    job.gen_done = True
                else:
                    job.pending.append(job.enc.add_chunk.remote(name, job.attempt, chunk_ref))
                    job.chunks_sent += 1
            elif kind == "chunk":
                job.pending.remove(ref)
                job.stats.add_chunk(ray.get(ref))
                self._event("chunk_done", job)
            else:
                result = ray.get(ref)
                job.commit_ref = None
                self._release(job)
                del active[wu]
                self._committed(job, result)
                return
            if job.gen_done and not job.pending and job.commit_ref is None:
                job.commit_ref = job.enc.commit.remote(name, job.attempt, job.chunks_sent,
                                                       fingerprint_record(job.fingerprint), job.target.supersedes)
        except (ray.exceptions.RayError, StopIteration) as e:
            active.pop(wu, None)
            self._fail(job, e, queue)


def run_producer(cfg: ProducerConfig, inputs: list[str], cache_dir: str, address: str | None = None,
                 num_cpus: int | None = None, report_path: str | None = None, on_event=None) -> dict:
    """Start (or join) Ray, run the producer, return the final report (also written to `report_path`). Before
    Ray starts, a bad encoders directory raises `ConfigError`, bad inputs or cache directory `InputError`.
    A run stopped early (SIGINT/SIGTERM, actors that cannot start) returns its report with `stopped` set."""
    run = ProducerRun(cfg, inputs, cache_dir, report_path, on_event)
    with ray_session(address, num_cpus):
        return run.run()
