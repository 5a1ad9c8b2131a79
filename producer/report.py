"""Producer statistics: live progress lines and the final report (JSON + a readable table).

Live (stderr, every `progress_interval_s`):
    [producer] shards 3/10 (+2 skipped, 2 active) | seen 1,234 written 1,100 | 45.6 samples/s | ETA 0:01:23 | drops: clarity=31 near_duplicate=12 ...

Final: counts per drop reason (in `filters.REASONS` order, then model-filter reasons), the bucket
histogram of what was written, throughput, and what became of each shard (`ShardOutcomes`): committed,
skipped (already in the cache), changed since its commit, discarded (another producer committed it
first), failed (with the root cause of its error; the JSON keeps the whole text), or not finished
because the run stopped early (`stopped`: interrupted, or actors that cannot start).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from producer.config import FilterConfig
from producer.filters import REASONS
from producer.score_histograms import histograms


@dataclass
class ShardOutcomes:
    """What became of the input shards of a run, besides the committed ones (RunStats.shards_committed)."""

    total: int
    skipped: list[str] = field(default_factory=list)  # committed before, input unchanged
    changed: list[dict] = field(default_factory=list)  # input changed since: work_unit, path, change, redone
    discarded: list[str] = field(default_factory=list)  # another writer committed the work unit first
    failed: list[dict] = field(default_factory=list)  # work_unit, path, attempts, root_cause, error (the full text)
    retries: int = 0

    def not_to_do(self) -> int:
        """Shards this run does not process: skipped, and changed ones that are kept as committed."""
        return len(self.skipped) + sum(not c["redone"] for c in self.changed)


@dataclass
class RunStats:
    seen: int = 0  # input records looked at (samples and bad records)
    written: int = 0
    drops: Counter = field(default_factory=Counter)
    transforms: Counter = field(default_factory=Counter)
    buckets: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)  # written samples per category (categories.py)
    tasks: Counter = field(default_factory=Counter)  # written samples per task: t2i, ti2i (edit pairs)
    scores: Counter = field(default_factory=Counter)  # measured images per score bin (score_histograms.py)
    shards_committed: int = 0
    cpu_seconds: float = 0.0
    encode_seconds: float = 0.0

    def add_chunk(self, s: dict) -> None:
        self.seen += s["seen"]
        self.written += s["written"]
        self.drops.update(s["drops"])
        self.transforms.update(s.get("transforms", {}))
        self.buckets.update(s["buckets"])
        self.categories.update(s.get("categories", {}))
        self.tasks.update(s.get("tasks", {}))
        self.scores.update(s.get("scores", {}))
        self.cpu_seconds += s.get("cpu_seconds", 0.0)
        self.encode_seconds += s.get("encode_seconds", 0.0)

    def merge(self, o: "RunStats") -> None:
        self.seen += o.seen
        self.written += o.written
        self.drops.update(o.drops)
        self.transforms.update(o.transforms)
        self.buckets.update(o.buckets)
        self.categories.update(o.categories)
        self.tasks.update(o.tasks)
        self.scores.update(o.scores)
        self.shards_committed += o.shards_committed
        self.cpu_seconds += o.cpu_seconds
        self.encode_seconds += o.encode_seconds


def ordered_drops(drops: Counter) -> dict:
    known = [(r, drops[r]) for r in REASONS if drops.get(r)]
    extra = sorted((r, n) for r, n in drops.items() if r not in REASONS and n)
    return dict(known + extra)


def _bucket_key(name: str):
    w, _, h = name.partition("x")
    return (int(w) / int(h), int(w)) if w.isdigit() and h.isdigit() else (0, 0)


def _eta(done: int, total: int, elapsed: float) -> str:
    if done <= 0 or done >= total:
        return "-"
    s = int(elapsed / done * (total - done))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressReporter:
    def __init__(self, total_shards: int, not_to_do: int, interval_s: float = 5.0, stream=None):
        self.total, self.skipped, self.interval = total_shards, not_to_do, interval_s
        self.stream = stream or sys.stderr
        self.t0 = time.time()
        self._last = 0.0
        self.timeline: list[list] = []  # [elapsed s, seen, written] at each progress line: samples/s over time

    def line(self, s: RunStats, active: int, failed: int, retries: int) -> str:
        el = max(1e-9, time.time() - self.t0)
        todo = self.total - self.skipped
        drops = " ".join(f"{k}={v}" for k, v in ordered_drops(s.drops).items()) or "none"
        extra = (f", {failed} failed" if failed else "") + (f", {retries} retried" if retries else "")
        return (f"[producer] shards {s.shards_committed}/{todo} (+{self.skipped} skipped, {active} active{extra}) | "
                f"seen {s.seen:,} written {s.written:,} | {s.seen / el:.1f} samples/s | "
                f"ETA {_eta(s.shards_committed, todo, el)} | drops: {drops}")

    def maybe_print(self, s: RunStats, active: int, failed: int, retries: int, force: bool = False) -> None:
        now = time.time()
        if force or now - self._last >= self.interval:
            self._last = now
            self.timeline.append([round(now - self.t0, 2), s.seen, s.written])
            print(self.line(s, active, failed, retries), file=self.stream, flush=True)

    def final(self, s: RunStats, elapsed: float, run: dict, out: ShardOutcomes, stopped: dict | None = None,
              filters: FilterConfig | None = None) -> dict:
        """The report. `stopped` (reason, message, ...) when the run ended before its queue was done;
        `filters`: the thresholds drawn on the score histograms."""
        el = max(1e-9, elapsed)
        dropped = sum(s.drops.values())
        done = s.shards_committed + len(out.discarded) + len(out.failed) + out.not_to_do()
        return {
            "run": run,
            "elapsed_s": round(elapsed, 3),
            "stopped": stopped,
            "shards": {"total": self.total, "committed": s.shards_committed,
                       "skipped_already_committed": len(out.skipped), "changed_since_commit": len(out.changed),
                       "discarded_committed_elsewhere": len(out.discarded), "failed": len(out.failed),
                       "retried_attempts": out.retries, "not_finished": self.total - done},
            "samples": {"seen": s.seen, "written": s.written, "dropped": dropped},
            "drops": ordered_drops(s.drops),
            "transforms": dict(s.transforms),
            "buckets": dict(sorted(s.buckets.items(), key=lambda kv: _bucket_key(kv[0]))),
            "categories": dict(sorted(s.categories.items(), key=lambda kv: (-kv[1], kv[0]))),
            "tasks": dict(sorted(s.tasks.items())),
            "score_histograms": histograms(s.scores, filters or FilterConfig()),
            "timeline": self.timeline + [[round(elapsed, 2), s.seen, s.written]],
            "throughput": {"samples_seen_per_s": round(s.seen / el, 3), "samples_written_per_s": round(s.written / el, 3),
                           "cpu_stage_seconds": round(s.cpu_seconds, 3), "encode_stage_seconds": round(s.encode_seconds, 3)},
            "failed_shards": out.failed,
            "changed_work_units": out.changed,
            "discarded_work_units": out.discarded,
            "skipped_work_units": out.skipped,
        }

    @staticmethod
    def write(report: dict, path: str) -> tuple[str, str]:
        """Write `path` (JSON) and the same report as a table next to it (`.txt`)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
        txt = table_path(path)
        with open(txt, "w") as f:
            f.write(format_table(report))
        return path, txt


def table_path(report_path: str) -> str:
    """Where `ProgressReporter.write` puts the table of the report at `report_path` (beside it, .txt)."""
    return os.path.splitext(report_path)[0] + ".txt"


def format_table(r: dict) -> str:
    s, sh, tp = r["samples"], r["shards"], r["throughput"]
    seen = max(1, s["seen"])
    redo = r["run"].get("redo_changed")
    shards = [f"{sh['committed']} committed", f"{sh['skipped_already_committed']} skipped (already in the cache)"]
    if sh["changed_since_commit"]:
        shards.append(f"{sh['changed_since_commit']} changed since their commit ("
                      + ("redone" if redo else "kept as committed; --redo-changed redoes them") + ")")
    if sh["discarded_committed_elsewhere"]:
        shards.append(f"{sh['discarded_committed_elsewhere']} discarded (committed elsewhere)")
    shards.append(f"{sh['failed']} failed")
    if sh["not_finished"]:
        shards.append(f"{sh['not_finished']} not finished")
    out = ["Producer report", "===============",
           f"shards    {', '.join(shards)}, {sh['retried_attempts']} retried attempts (of {sh['total']})",
           f"samples   {s['seen']:,} seen, {s['written']:,} written ({100 * s['written'] / seen:.1f}%), "
           f"{s['dropped']:,} dropped",
           f"time      {r['elapsed_s']:.1f} s, {tp['samples_seen_per_s']:.1f} samples/s seen, "
           f"{tp['samples_written_per_s']:.1f} written/s (CPU stage {tp['cpu_stage_seconds']:.1f} s, "
           f"encoders {tp['encode_stage_seconds']:.1f} s summed over actors)", ""]
    out.append(f"{'drop reason':<24}{'count':>10}{'% of seen':>11}")
    out.append("-" * 45)
    for k, v in r["drops"].items():
        out.append(f"{k:<24}{v:>10,}{100 * v / seen:>10.1f}%")
    if not r["drops"]:
        out.append(f"{'(none)':<24}")
    for k, v in r.get("transforms", {}).items():
        out.append(f"{'[applied] ' + k:<24}{v:>10,}")
    out += ["", f"{'bucket (w x h)':<24}{'samples':>10}{'share':>11}", "-" * 45]
    total = max(1, sum(r["buckets"].values()))
    for k, v in r["buckets"].items():
        out.append(f"{k:<24}{v:>10,}{100 * v / total:>10.1f}%")
    out += ["", f"{'category':<24}{'samples':>10}{'share':>11}", "-" * 45]
    for k, v in r.get("categories", {}).items():
        out.append(f"{k:<24}{v:>10,}{100 * v / total:>10.1f}%")
    if r.get("tasks", {}).get("ti2i"):  # only a run with edit pairs: a text-to-image report stays as it was
        out += ["", f"{'task':<24}{'samples':>10}{'share':>11}", "-" * 45]
        for k, v in r["tasks"].items():
            out.append(f"{k:<24}{v:>10,}{100 * v / total:>10.1f}%")
    for c in r["changed_work_units"]:
        out.append(f"CHANGED {c['work_unit']} ({c['path']}): {c['change']}" + (" (redone)" if c["redone"] else ""))
    for f in r["failed_shards"]:
        out.append(f"FAILED {f['work_unit']} after {f['attempts']} attempts: {f['root_cause']}")
    if r["stopped"]:
        out.append(f"STOPPED {r['stopped']['message']}")
    return "\n".join(out) + "\n"
