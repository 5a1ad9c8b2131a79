"""python -m producer --input SHARDS... --cache-dir DIR [--config configs/producer/default.yaml] [key=value ...]

Reads image-caption shards (img2dataset's webdataset or parquet output, WebDataset tars, Hugging Face
`datasets` parquet or imagefolders, image folders), filters, encodes with the Qwen-Image VAE and
Qwen2.5-VL, and writes the bucketed latent cache. Prints what it detected in each input before Ray
starts (--dry-run: only that, and the first samples). Starts a local Ray unless --address joins a
running cluster. Prints live progress; writes a JSON + table report.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import sys
import time

from megatron_qwen_image.config import ConfigError, split_overrides
from producer.config import load_config
from producer.errors import interruption_name
from producer.pipeline import run_producer
from producer.report import format_table
from producer.sources import BadRecord, InputError, discover_inputs, iter_shard


# Command-line flags: shorthands for config keys (any key can also be set as key=value).
FLAGS = {"encoders": "encoders.dir", "cpu_actors": "pools.cpu_actors", "encoder_actors": "pools.encoder_actors",
         "base_resolution": "base_resolution", "redo_changed": "sources.redo_changed"}


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides, rest = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m producer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any config key can be set as key=value anywhere on the command line, e.g. "
                                       "filters.min_side=384 (docs/configuration.md lists them).")
    p.add_argument("--input", nargs="+", required=True, action="extend",
                   help="tar/parquet files, directories of them, image folders, or globs (repeatable)")
    p.add_argument("--cache-dir", default=None, help="latent cache directory (created if missing; required "
                   "unless --dry-run)")
    p.add_argument("--config", default=None, help="producer YAML (configs/producer/*.yaml)")
    p.add_argument("--encoders", default=None, help="local HF-layout encoder dir (overrides encoders.dir)")
    p.add_argument("--cpu-actors", default=None, help="CPU (decode+filter) actors: N or MIN:MAX (autoscale)")
    p.add_argument("--encoder-actors", default=None, help="encoder (VAE+MLLM) actors: N or MIN:MAX (autoscale)")
    p.add_argument("--base-resolution", type=int, default=None, help="bucket family: 256 | 640 | 1328")
    p.add_argument("--redo-changed", action="store_true", default=None,
                   help="redo work units whose input changed since their commit (= sources.redo_changed=true)")
    p.add_argument("--address", default=None, help="Ray cluster address to join (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--report", default=None,
                   help="report JSON path (default: CACHE_DIR/reports/producer-<UTC time>.json, plus .txt)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the detected layouts, the shards and their first samples; encode nothing")
    p.add_argument("--samples", type=int, default=3, help="--dry-run: samples shown per shard (default 3)")
    args = p.parse_args(rest)
    if args.cache_dir is None and not args.dry_run:
        p.error("--cache-dir is required (unless --dry-run)")
    args.overrides = overrides
    return args


def stop_line(report: dict) -> str:
    """One line on why a run stopped early and what it had done by then."""
    sh, stopped = report["shards"], report["stopped"]
    if stopped["reason"] != "interrupted":
        return f"error: {stopped['message']}"
    return (f"interrupted by {stopped['signal']}: {sh['committed']} shards committed by this run, "
            f"{sh['skipped_already_committed']} already in the cache, {sh['not_finished']} not finished "
            f"(of {sh['total']}); run the same command again to do the rest")


DRY_RUN_SHARDS = 10  # shards whose first samples --dry-run shows


def dry_run(cfg, inputs: list[str], samples: int) -> None:
    """What a run would read: each input's layout, its shards, the first samples' keys and captions."""
    detected = discover_inputs(inputs, cfg.sources)
    for d in detected:
        print(d.line())
    specs = [s for d in detected for s in d.shards]
    for spec in specs[:DRY_RUN_SHARDS]:
        print(f"shard {spec.work_unit} ({spec.kind}: {spec.path})")
        for rec in itertools.islice(iter_shard(spec, cfg.sources), samples):
            if isinstance(rec, BadRecord):
                print(f"  {rec.key or '-'}: dropped: {rec.reason} ({rec.detail[:100]})")
            else:
                caption = (rec.caption or b"").decode("utf-8", errors="replace").replace("\n", " ")
                print(f"  {rec.key}: {len(rec.image)} bytes {rec.image_ext or 'image'}, caption "
                      f"{caption[:80] + ('...' if len(caption) > 80 else '')!r}")
    if len(specs) > DRY_RUN_SHARDS:
        print(f"... and {len(specs) - DRY_RUN_SHARDS} more shards")
    print(f"dry run: {len(specs)} shards, nothing encoded")


def main(argv=None) -> int:
    """Exit status: 0; 1 if a shard failed or the run stopped (actors that cannot start); 2 for a bad config,
    input or cache directory (before Ray starts); 128 + the signal's number when SIGINT/SIGTERM stopped it."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        cfg = load_config(args.config, args.overrides, {key: getattr(args, flag) for flag, key in FLAGS.items()})
        if args.dry_run:
            dry_run(cfg, args.input, args.samples)
            return 0
        report_path = args.report or os.path.join(
            args.cache_dir, "reports", time.strftime("producer-%Y%m%dT%H%M%SZ.json", time.gmtime()))
        report = run_producer(cfg, args.input, args.cache_dir, address=args.address, num_cpus=args.num_cpus,
                              report_path=report_path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except InputError as e:
        print(f"input error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # outside the run's loop (reading the inputs, starting Ray, writing the report)
        name = interruption_name(e)
        print(f"interrupted by {name} outside the run's main loop: no report; what was committed is in the cache",
              file=sys.stderr)
        return 128 + signal.Signals[name]
    print(format_table(report))
    print(f"report: {report_path} (+ .txt)", file=sys.stderr)
    stopped = report["stopped"]
    if stopped:
        print(stop_line(report), file=sys.stderr)
        return 128 + signal.Signals[stopped["signal"]] if stopped["reason"] == "interrupted" else 1
    return 1 if report["shards"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
