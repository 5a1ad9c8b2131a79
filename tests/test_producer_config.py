"""Producer config: YAML -> validated dataclasses; every bad value refused with the key in the message,
and everything the CLI can check before Ray starts (encoders directory, inputs, cache directory)."""
import os

import pytest

from megatron_qwen_image.config import ConfigError, yaml_load
from producer.config import PoolSize, load_config


def test_default_yaml_loads_and_matches_dataclass_defaults():
    from producer.config import ProducerConfig

    cfg = load_config("configs/producer/default.yaml")
    ref = ProducerConfig()
    assert cfg.filters == ref.filters  # the YAML documents the code defaults, it does not change them
    assert cfg.pools.cpu_actors == PoolSize(2, 2) and cfg.pools.encoder_actors == PoolSize(1, 1)


def test_all_shipped_producer_configs_load():
    import glob

    paths = sorted(glob.glob("configs/producer/*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        load_config(path)
    assert load_config("configs/producer/tiny.yaml").pools.encoder_num_gpus == 0  # an int where "auto" may stand


@pytest.mark.parametrize("value, expected", [("4", PoolSize(4, 4)), ("1:8", PoolSize(1, 8)),
                                             ("{min: 2, max: 3}", PoolSize(2, 3)), ("{max: 5}", PoolSize(1, 5))])
def test_pool_sizes_fixed_or_autoscaling(value, expected):
    assert load_config(None, [f"pools.cpu_actors={value}"]).pools.cpu_actors == expected


@pytest.mark.parametrize("flag, expected", [("3", PoolSize(3, 3)), ("2:6", PoolSize(2, 6))])
def test_pool_size_flags_take_counts_and_ranges(flag, expected):
    # what argparse hands over for `--cpu-actors 3` / `--encoder-actors 2:6`: strings
    cfg = load_config(None, None, {"pools.cpu_actors": flag, "pools.encoder_actors": flag})
    assert cfg.pools.cpu_actors == expected and cfg.pools.encoder_actors == expected


def test_yaml_has_no_base60_numbers():
    assert yaml_load("a: 1:4\nb: 1e-3\nc: 12") == {"a": "1:4", "b": 0.001, "c": 12}


@pytest.mark.parametrize("override, key", [
    ("filters.min_sid=3", "filters.min_sid"),
    ("filters.min_side=abc", "filters.min_side"),
    ("filters.min_side=-1", "filters.min_side"),
    ("filters.max_luma=2", "filters.max_luma"),
    ("filters.min_luma=0.99", "filters.min_luma"),
    ("filters.max_aspect=0.5", "filters.max_aspect"),
    ("filters.dedup_near_max_distance=40", "filters.dedup_near_max_distance"),
    ("filters.max_caption_tokens=5000", "filters.max_caption_tokens"),
    ("filters.caption_boilerplate=['([']", "filters.caption_boilerplate[0]"),
    ("pools.cpu_actors=0", "pools.cpu_actors"),
    ("pools.encoder_actors=4:2", "pools.encoder_actors"),
    ("pools.encoder_num_gpus=many", "pools.encoder_num_gpus"),
    ("pools.chunk_size=0", "pools.chunk_size"),
    ("pools.max_actor_start_failures=0", "pools.max_actor_start_failures"),
    ("latent_dtype=int8", "latent_dtype"),
    ("base_resolution=512", "base_resolution"),
    ("encoders.vae_sample_mode=random", "encoders.vae_sample_mode"),
    ("model_filters=[3]", "model_filters[0]"),
    ("dedup_exact=true", "dedup_exact"),
    ("categories.rules=[{category: text, caption: '(['}]", "categories.rules[0].caption"),
    ("categories.rules=[{category: '', caption: x}]", "categories.rules[0].category"),
    ("categories.default=' '", "categories.default"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.key == key and str(e.value).startswith(f"config key '{key}'"), str(e.value)


def test_null_disables_a_filter():
    cfg = load_config(None, ["filters.min_clarity=null", "filters.max_texture=null"])
    assert cfg.filters.min_clarity is None and cfg.filters.max_texture is None


def test_cli_refuses_bad_config_before_starting_ray(tmp_path, capsys):
    from producer.__main__ import main

    args = ["--input", str(tmp_path), "--cache-dir", str(tmp_path / "c")]
    assert main(args + ["--encoders", str(tmp_path), "filters.min_sid=3"]) == 2
    assert "config key 'filters.min_sid' (set on the command line): unknown key" in capsys.readouterr().err
    assert main(args + ["--encoders", str(tmp_path), "--cpu-actors", "0"]) == 2
    assert "pools.cpu_actors" in capsys.readouterr().err
    assert main(args) == 2
    assert "config key 'encoders.dir': required" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def fake_encoders_dir(root) -> str:
    """A directory with every file check_encoders_dir looks for (empty files: nothing here loads them)."""
    for rel in ("text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json",
                "tokenizer/tokenizer.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        path = root / "encoders" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    return str(root / "encoders")


@pytest.fixture
def no_ray(monkeypatch):
    import producer.pipeline

    monkeypatch.setattr(producer.pipeline, "init_ray", lambda *a: pytest.fail("Ray started despite a bad start-up"))


def test_cli_refuses_bad_inputs_before_starting_ray(tmp_path, capsys, no_ray):
    from producer.__main__ import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.csv").write_text("a,b")
    base = ["--cache-dir", str(tmp_path / "c"), "--encoders", fake_encoders_dir(tmp_path)]
    for inputs, msg in (([str(tmp_path / "missing.tar")], "does not exist"),
                        ([str(tmp_path / "*.tar")], "matches nothing"),
                        ([str(tmp_path / "empty")], "holds no tar, parquet, imagefolder metadata or image files"),
                        ([str(tmp_path / "notes.csv")], "unsupported input file")):
        assert main(["--input", *inputs, *base]) == 2
        err = capsys.readouterr().err
        assert "input error: " in err and msg in err and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()


def test_cli_refuses_an_incomplete_encoders_dir_before_starting_ray(tmp_path, capsys, no_ray):
    """An empty directory, one holding only vae/, a component directory instead of the pipeline directory:
    one line naming the key and what is missing, exit 2 (these made the encoder actors die forever)."""
    from producer.__main__ import main

    full = fake_encoders_dir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_vae").mkdir()
    (tmp_path / "only_vae" / "vae").symlink_to(os.path.join(full, "vae"))
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.tar").write_bytes(b"")
    base = ["--input", str(tmp_path / "raw"), "--cache-dir", str(tmp_path / "c")]
    for encoders, missing in ((tmp_path / "empty", "no Qwen2.5-VL text encoder"),
                              (tmp_path / "only_vae", "no Qwen2.5-VL text encoder"),
                              (os.path.join(full, "text_encoder"), "looks like a text_encoder/ component: pass its "
                                                                  "parent directory")):
        assert main([*base, "--encoders", str(encoders)]) == 2
        err = capsys.readouterr().err
        [line] = err.splitlines()
        assert line.startswith("error: config key 'encoders.dir': ") and missing in line, err
    assert not (tmp_path / "c").exists()


def test_cli_refuses_a_cache_dir_that_is_a_file_before_starting_ray(tmp_path, capsys, no_ray):
    from producer.__main__ import main

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.tar").write_bytes(b"")
    (tmp_path / "cache").write_text("not a directory")
    args = ["--input", str(tmp_path / "raw"), "--encoders", fake_encoders_dir(tmp_path)]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == f"input error: --cache-dir {str(tmp_path / 'cache')!r} is a file, not a directory"
    assert main([*args, "--cache-dir", str(tmp_path / "cache" / "sub")]) == 2  # a file in the way
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("input error: --cache-dir ") and "Not a directory" in line, line
