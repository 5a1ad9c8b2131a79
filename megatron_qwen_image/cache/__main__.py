"""python -m megatron_qwen_image.cache {init,inspect,verify,cleanup,seal,compact,report} DIR

init     create an empty cache (what a streaming trainer started before the producers needs; producers
         create it themselves too, and init on an existing cache changes nothing)
inspect  buckets (image-editing samples per condition group: "640x480 +cond 16x80x60"), samples, bytes
         per sample, text-length histogram (--json for machines); with --decode KEY --encoders DIR:
         that sample decoded back to pixels through the VAE, as a PNG
verify   re-check every shard: size, whole-file CRC-32, Arrow structure, every sample's CRC-32 (over
         its condition latents too), and the manifest snapshots against the entries (exit status 1 if
         anything is bad)
cleanup  delete temp files of dead writers and unreferenced shard files older than --grace-s
seal     declare the cache complete (streaming loaders finish; writers refuse new commits)
compact  snapshot the manifest so that readers open it with one large read plus the entries after it
         (safe while producers write; run it now and then on a cache with many work units)
report   the data report: drops, score histograms with thresholds, buckets, text lengths, producer
         throughput and (with --encoders) decoded samples per bucket, as HTML + PNGs
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .format import CacheFormatError
from .maintenance import cleanup, inspect_cache, verify_snapshots
from .manifest import SNAPSHOTS_KEPT, compact, ensure_cache_dirs, seal
from .reader import CacheReader


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _data_report():
    # Imported on demand: it loads matplotlib and diffusers (the VAE), which inspect/verify/seal, run by
    # trainers and producers, do not need.
    from . import data_report
    return data_report


def cmd_inspect(args) -> int:
    if args.decode is not None:
        if not args.encoders:
            print("error: --decode needs --encoders DIR (the Qwen-Image VAE)", file=sys.stderr)
            return 2
        out = args.out or f"{args.decode.replace('/', '_')}.png"
        try:
            _data_report().decode_key(args.dir, args.decode, args.encoders, out)
        except KeyError as e:
            print(f"error: {e.args[0]}", file=sys.stderr)
            return 2
        print(f"{args.decode} decoded through the VAE: {out}")
        return 0
    info = inspect_cache(args.dir)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"cache {info['root']}  format v{info['format_version']}  {'sealed' if info['sealed'] else 'open'}")
    print(f"  {info['entries']} manifest entries ({info['work_units']} work units, {info['duplicate_entries']} "
          f"duplicate, {len(info['corrupt_entries'])} unreadable), {info['samples']} samples, "
          f"{_fmt_bytes(info['bytes'])}")
    if info["snapshot_entries"]:
        print(f"  manifest snapshot: {info['snapshot_entries']} entries (the rest read from entry files)")
    if info["exclusion_list"]:
        print(f"  exclusion list {info['exclusion_list']}: {info['excluded_samples']} samples skipped by loaders")
    width = max([11, *map(len, info["buckets"])])  # image-editing groups are named "640x480 +cond 16x80x60"
    print(f"  {'bucket':>{width}} {'latent':>12} {'shards':>7} {'samples':>9} {'bytes/sample':>13} {'dtype':>6} "
          f"{'text D':>6} {'text len min/mean/max':>22}")
    for name, b in info["buckets"].items():
        tl = b.get("text_len", {})
        lens = f"{tl.get('min', '-')}/{tl.get('mean', 0):.1f}/{tl.get('max', '-')}" if tl else "-"
        print(f"  {name:>{width}} {'x'.join(map(str, b['latent_shape'])):>12} {b['shards']:>7} {b['samples']:>9} "
              f"{_fmt_bytes(b['bytes_per_sample']):>13} {','.join(b['latent_dtypes']):>6} "
              f"{','.join(map(str, b['text_dims'])):>6} {lens:>22}")
    hist = {}
    for b in info["buckets"].values():
        for k, v in b.get("text_len", {}).get("histogram", {}).items():
            hist[k] = hist.get(k, 0) + v
    if hist:
        total = max(1, sum(hist.values()))
        print("  text length histogram (tokens: samples)")
        for k, v in hist.items():
            print(f"    {k:>9}: {v:>8}  {'#' * round(40 * v / total)}")
    return 0


def cmd_verify(args) -> int:
    t0 = time.time()
    r = CacheReader(args.dir)

    def progress(i, n):
        if not args.quiet and (i == n or i % 50 == 0):
            print(f"  verified {i}/{n} shards ({time.time() - t0:.1f} s)", file=sys.stderr)

    rep = r.verify_all(progress)
    snapshot_problems = verify_snapshots(args.dir)
    for path, reason in rep["bad"]:
        print(f"BAD  {path}: {reason}")
    for reason in rep["corrupt_entries"]:
        print(f"BAD  manifest entry {reason}")
    for reason in snapshot_problems:
        print(f"BAD  manifest snapshot {reason}")
    print(f"{rep['ok']} shards OK ({rep['samples']} samples), {len(rep['bad'])} bad, "
          f"{len(rep['corrupt_entries'])} unreadable manifest entries"
          + (f", {len(snapshot_problems)} bad manifest snapshots" if snapshot_problems else ""))
    return 1 if rep["bad"] or rep["corrupt_entries"] or snapshot_problems else 0


def cmd_cleanup(args) -> int:
    rep = cleanup(args.dir, grace_s=args.grace_s, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for kind, paths in rep.items():
        for p in paths:
            print(f"{verb} {kind[:-1].replace('_', ' ')}: {p}")
    print(f"{verb} {len(rep['temp_files'])} temp files, {len(rep['unreferenced_shards'])} unreferenced shards")
    return 0


def cmd_init(args) -> int:
    content = ensure_cache_dirs(args.dir)
    print(f"cache {args.dir} ready (format {content.get('format_version')})")
    return 0


def cmd_seal(args) -> int:
    print(f"sealed {args.dir} at {seal(args.dir)} manifest entries")
    return 0


def cmd_compact(args) -> int:
    t0 = time.time()
    c = compact(args.dir, full=args.full, keep=args.keep)
    if c.num_entries == 0:
        print(f"nothing to compact: the manifest of {args.dir} is empty")
        return 0
    how = "written" if c.created else "already there (a concurrent compaction wrote it)"
    print(f"snapshot of {c.num_entries} manifest entries {how}: {c.path} ({c.from_snapshot} taken from the "
          f"previous snapshot, {c.num_entries - c.from_snapshot} read from entry files, {time.time() - t0:.1f} s); "
          f"pruned {len(c.removed)} older snapshots")
    return 0


def cmd_report(args) -> int:
    index = _data_report().write_report(args.dir, args.out, args.encoders, args.per_bucket, args.reports)
    print(f"data report: {index}" + ("" if args.encoders else " (no decoded samples: pass --encoders DIR)"))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_qwen_image.cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("init", help="create an empty cache (no-op on an existing one)")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_init)
    s = sub.add_parser("inspect", help="summary of a cache")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true", help="print machine-readable JSON")
    s.add_argument("--decode", metavar="KEY", default=None, help="decode this sample to a PNG (needs --encoders)")
    s.add_argument("--encoders", default=None, help="encoders directory with the Qwen-Image VAE (vae/)")
    s.add_argument("--out", default=None, help="--decode: PNG path (default: KEY.png here)")
    s.set_defaults(fn=cmd_inspect)
    s = sub.add_parser("verify", help="re-check all checksums")
    s.add_argument("dir")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser("cleanup", help="remove leftovers of killed writers")
    s.add_argument("dir")
    s.add_argument("--grace-s", type=float, default=3600.0, help="only touch files older than this (default 3600)")
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(fn=cmd_cleanup)
    s = sub.add_parser("seal", help="declare the cache complete")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_seal)
    s = sub.add_parser("compact", help="snapshot the manifest for fast opening (safe while producers write)")
    s.add_argument("dir")
    s.add_argument("--full", action="store_true", help="read every entry file, ignoring earlier snapshots")
    s.add_argument("--keep", type=int, default=SNAPSHOTS_KEPT,
                   help=f"snapshots to keep, the new one included (default {SNAPSHOTS_KEPT})")
    s.set_defaults(fn=cmd_compact)
    s = sub.add_parser("report", help="the data report (HTML + PNGs)")
    s.add_argument("dir")
    s.add_argument("--encoders", default=None, help="encoders directory with the VAE: adds decoded samples per bucket")
    s.add_argument("--out", default=None, help="output directory (default: DIR/reports/data)")
    s.add_argument("--per-bucket", type=int, default=4, help="decoded samples per bucket (default 4)")
    s.add_argument("--reports", nargs="+", default=None,
                   help="producer run reports (default: DIR/reports/producer-*.json)")
    s.set_defaults(fn=cmd_report)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except CacheFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
