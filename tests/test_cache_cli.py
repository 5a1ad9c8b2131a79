"""python -m megatron_qwen_image.cache init|inspect|verify|cleanup|seal (run in-process through main())."""
import json
import os

import torch

from megatron_qwen_image.cache import CacheReader, CacheWriter
from megatron_qwen_image.cache.__main__ import main


def _cache(root):
    for unit in range(2):
        with CacheWriter(root, f"u{unit}", base_resolution=256) as w:
            for i in range(5):
                hw = (32, 32) if i % 2 else (24, 42)
                w.add(f"u{unit}-{i}", torch.randn(16, *hw), torch.randn(3 + i, 8))


def test_inspect_verify_seal_cleanup(tmp_path, capsys):
    root = str(tmp_path / "c")
    _cache(root)
    assert main(["inspect", root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["samples"] == 10 and info["work_units"] == 2 and not info["sealed"]
    assert info["buckets"]["256x256"]["samples"] == 4 and info["buckets"]["336x192"]["samples"] == 6
    assert info["buckets"]["256x256"]["text_len"]["max"] == 3 + 3
    assert main(["inspect", root]) == 0
    assert "text length histogram" in capsys.readouterr().out
    assert main(["verify", root, "--quiet"]) == 0
    assert "4 shards OK (10 samples), 0 bad" in capsys.readouterr().out

    bad = os.path.join(root, CacheReader(root).shards()[1].path)
    blob = bytearray(open(bad, "rb").read())
    blob[len(blob) // 3] ^= 0x40  # one flipped bit somewhere in the data
    with open(bad + ".new", "wb") as f:
        f.write(blob)
    os.replace(bad + ".new", bad)
    assert main(["verify", root, "--quiet"]) == 1
    assert f"BAD  {os.path.relpath(bad, root)}" in capsys.readouterr().out

    assert main(["seal", root]) == 0
    assert "sealed" in capsys.readouterr().out and CacheReader(root).sealed
    open(os.path.join(root, "_tmp", "wu-dead.tmp"), "w").close()
    assert main(["cleanup", root, "--grace-s", "0"]) == 0
    assert "removed 1 temp files" in capsys.readouterr().out


def test_unknown_version_gives_a_clear_error_and_exit_status_2(tmp_path, capsys):
    root = str(tmp_path / "c")
    _cache(root)
    p = os.path.join(root, "CACHE.json")
    json.dump({**json.load(open(p)), "format_version": 5}, open(p, "w"))
    assert main(["verify", root]) == 2
    assert "format_version 5 is not supported" in capsys.readouterr().err


def test_init_creates_an_empty_cache_and_leaves_a_filled_one_alone(tmp_path, capsys):
    root = str(tmp_path / "new")
    assert main(["inspect", root]) == 2  # not a cache yet
    capsys.readouterr()
    assert main(["init", root]) == 0 and "ready" in capsys.readouterr().out
    reader = CacheReader(root)
    assert list(reader.iter_records()) == [] and not reader.sealed
    marker = open(os.path.join(root, "CACHE.json")).read()
    _cache(root)  # writers accept the initialised cache
    assert main(["init", root]) == 0
    assert open(os.path.join(root, "CACHE.json")).read() == marker
    assert len(list(CacheReader(root).iter_records())) == 10
