"""python -m producer --input SHARDS... --cache-dir DIR [--config configs/producer/default.yaml] [key=value ...]

Reads image-caption shards (WebDataset tars, Parquet, image folders), filters, encodes with the
Qwen-Image VAE and Qwen2.5-VL, and writes the bucketed latent cache. Starts a local Ray unless
--address joins a running cluster. Prints live progress; writes a JSON + table report.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from megatron_qwen_image.config import ConfigError, split_overrides
from producer.config import load_config
from producer.pipeline import run_producer
from producer.report import format_table
from producer.sources import InputError


# Command-line flags: shorthands for config keys (any key can also be set as key=value).
FLAGS = {"encoders": "encoders.dir", "cpu_actors": "pools.cpu_actors", "encoder_actors": "pools.encoder_actors",
         "base_resolution": "base_resolution"}


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides, rest = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m producer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any config key can be set as key=value anywhere on the command line, e.g. "
                                       "filters.min_side=384 (docs/configuration.md lists them).")
    p.add_argument("--input", nargs="+", required=True, action="extend",
                   help="tar/parquet files, directories of them, image folders, or globs (repeatable)")
    p.add_argument("--cache-dir", required=True, help="latent cache directory (created if missing)")
    p.add_argument("--config", default=None, help="producer YAML (configs/producer/*.yaml)")
    p.add_argument("--encoders", default=None, help="local HF-layout encoder dir (overrides encoders.dir)")
    p.add_argument("--cpu-actors", default=None, help="CPU (decode+filter) actors: N or MIN:MAX (autoscale)")
    p.add_argument("--encoder-actors", default=None, help="encoder (VAE+MLLM) actors: N or MIN:MAX (autoscale)")
    p.add_argument("--base-resolution", type=int, default=None, help="bucket family: 256 | 640 | 1328")
    p.add_argument("--address", default=None, help="Ray cluster address to join (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--report", default=None,
                   help="report JSON path (default: CACHE_DIR/reports/producer-<UTC time>.json, plus .txt)")
    args = p.parse_args(rest)
    args.overrides = overrides
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        cfg = load_config(args.config, args.overrides, {key: getattr(args, flag) for flag, key in FLAGS.items()})
        if not cfg.encoders.dir:
            raise ConfigError("encoders.dir", "required (a local Qwen-Image repo, or "
                              "`python -m megatron_qwen_image.encoders.make_tiny DIR`); set it or pass --encoders")
        if not os.path.isdir(cfg.encoders.dir):
            raise ConfigError("encoders.dir", f"{cfg.encoders.dir!r} is not a directory")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report_path = args.report or os.path.join(
        args.cache_dir, "reports", time.strftime("producer-%Y%m%dT%H%M%SZ.json", time.gmtime()))
    try:
        report = run_producer(cfg, args.input, args.cache_dir, address=args.address, num_cpus=args.num_cpus,
                              report_path=report_path)
    except InputError as e:
        print(f"input error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"report: {report_path} (+ .txt)", file=sys.stderr)
    return 1 if report["shards"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
