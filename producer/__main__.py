"""python -m producer --input SHARDS... --cache-dir DIR [--config configs/producer/default.yaml] [options]

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m producer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set filters.min_side=384 (repeatable)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from producer.config import ConfigError, load_config

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        cfg = load_config(args.config, args.overrides, extra={
            "encoders.dir": args.encoders, "pools.cpu_actors": args.cpu_actors,
            "pools.encoder_actors": args.encoder_actors, "base_resolution": args.base_resolution,
        })
        if not cfg.encoders.dir:
            raise ConfigError("encoders.dir: required (a local Qwen-Image repo, or "
                              "`python -m megatron_qwen_image.encoders.make_tiny DIR`); set it or pass --encoders")
        if not os.path.isdir(cfg.encoders.dir):
            raise ConfigError(f"encoders.dir: {cfg.encoders.dir!r} is not a directory")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from producer.pipeline import run_producer
    from producer.report import format_table
    from producer.sources import InputError

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
