"""Config loading, overrides, and refusal of bad values at start-up with a message naming the key."""
import os

import pytest

from consumer.config import load_config, validate
from megatron_qwen_image.config import ConfigError
from tests.torchrun import REPO

SMOKE = os.path.join(REPO, "configs", "smoke_tp2.yaml")


def test_smoke_config_inherits_the_tiny_model_and_overrides_apply():
    cfg = load_config(SMOKE, ["optimizer.lr=3e-3", "model.num_layers=3", "recompute.recompute_num_layers=2"])
    assert cfg.model.hidden_size == 64 and cfg.model.axes_dims_rope == [4, 6, 6]  # from model/tiny.yaml
    assert cfg.parallelism.tensor_model_parallel_size == 2  # the smoke file overrides tiny.yaml's TP=1
    assert cfg.optimizer.lr == 3e-3 and cfg.model.num_layers == 3 and cfg.recompute.recompute_num_layers == 2


def test_all_shipped_configs_load():
    import glob

    paths = sorted(p for d in ("", "model", "tiny") for p in glob.glob(os.path.join(REPO, "configs", d, "*.yaml")))
    assert len(paths) >= 12
    for path in paths:
        load_config(path)


@pytest.mark.parametrize("stage, families, resolution", [
    ("stage_256p", 256, 256), ("stage_640p", 640, 640), ("stage_1328p", 1328, 1328),
    ("stage_multiscale_640_1328", {640: 0.7, 1328: 0.3}, 1328)])
def test_stage_configs_read_their_bucket_families_and_fit_the_20b_layout(stage, families, resolution, capsys):
    """Each curriculum stage's trainer config (docs/curriculum.md): its bucket families, and a dry run at its
    (largest) resolution on TP 4 x DP 8 that fits 80 GB GPUs."""
    from consumer.train import main

    cfg = load_config(os.path.join(REPO, "configs", f"{stage}.yaml"))
    c = cfg.data.cache
    assert (c.family_weights if isinstance(families, dict) else c.base_resolution) == families
    assert cfg.parallelism.tensor_model_parallel_size == 4
    assert main(["--config", os.path.join(REPO, "configs", f"{stage}.yaml"), "--dry-run", "--dp", "8", "--resolution",
                 str(resolution), "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "\nrecommended: " in out
    if isinstance(families, dict):  # compute-balanced: the planned 1328p step has 56 samples, one per micro-batch
        assert "| 1328 | 1328x1328 | 56 | 1 | 7 | 0.964 |" in out and "| 640 | 640x640 | 256 | 2 | 16 | 1.000 |" in out


@pytest.mark.parametrize("overrides, key, words", [
    (["lerning_rate=1e-3"], "lerning_rate", "unknown key"),
    (["optimizer.lerning_rate=1e-3"], "optimizer.lerning_rate", "unknown key"),
    (["model.num_layer=3"], "model.num_layer", "did you mean 'model.num_layers'"),
    (["eval_interval=10"], "eval_interval", "did you mean 'validation.eval_interval'"),  # its section left out
    (["validation.loss_sigmas=[0, 0.5]"], "validation.loss_sigmas", "a non-empty list of sigmas in (0, 1]"),
    (["validation.steps=0"], "validation.steps", "must be >= 1"),
    (["parallelism.tensor_model_parallel_size=3"], "parallelism.tensor_model_parallel_size",
     "does not divide num_attention_heads=4"),
    (["recompute.recompute_granularity=partial"], "recompute.recompute_granularity", "must be one of"),
    (["recompute.recompute_method=null"], "recompute.recompute_method", "must be 'uniform' or 'block'"),
    (["recompute.recompute_num_layers=5"], "recompute.recompute_num_layers", "must be in [1, num_layers=2]"),
    (["recompute.recompute_granularity=selective"], "recompute.recompute_method",
     "only applies to recompute_granularity=full"),
    (["train.global_batch_size=5"], "train.global_batch_size", "not a multiple of train.micro_batch_size=2"),
    (["optimizer.lr=fast"], "optimizer.lr", "must be a number"),
    (["train.train_iters=1.5"], "train.train_iters", "must be an integer"),
    (["optimizer.use_distributed_optimizer=maybe"], "optimizer.use_distributed_optimizer", "must be true or false"),
    (["optimizer.min_lr=1.0"], "optimizer.min_lr", "must be in [0, optimizer.lr="),
    (["schedule.lr_warmup_iters=20"], "schedule.lr_warmup_iters", "must be in [0, lr_decay_iters=20)"),
    (["model.axes_dims_rope=[4, 4, 4]"], "model.axes_dims_rope", "must sum to the head dim"),
    (["model.hidden_size=66"], "model.hidden_size", "not divisible by num_attention_heads"),
    (["recompute.recompute_granularity=selective", "recompute.recompute_method=null",
      "recompute.recompute_num_layers=null", "recompute.recompute_modules=[moe]"], "recompute.recompute_modules",
     "choose from"),
    (["recompute.recompute_modules=[mlp]"], "recompute.recompute_modules",
     "only applies to recompute_granularity=selective"),
    (["flow_matching.timestep_shift=dynamo"], "flow_matching.timestep_shift", "must be one of"),
    (["data.synthetic.resolutions=[[64, 60]]"], "data.synthetic.resolutions", "divisible by 16"),
    (["data.cache.verify=sometimes"], "data.cache.verify", "must be one of"),
    (["data.cache.wait_log_interval_s=0"], "data.cache.wait_log_interval_s", "must be > 0"),
    (["model=3"], "model", "must be a mapping"),
    (["optimizer.lr"], "optimizer.lr", "key=value"),
])
def test_bad_values_are_refused_naming_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, overrides)
    assert err.value.key == key
    assert str(err.value).startswith(f"config key '{key}'")
    assert words in str(err.value)


def test_layout_checks_at_start_of_training():
    cfg = load_config(SMOKE)
    validate(cfg, world_size=4)  # TP 2 x DP 2: 4 = 2 x 1 micro x 2 DP ... global 4 ok
    with pytest.raises(ConfigError, match="world size 3 is not divisible by tensor_model_parallel_size=2"):
        validate(cfg, world_size=3)
    with pytest.raises(ConfigError, match=r"global_batch_size.*micro_batch_size x data-parallel size = 2 x 4"):
        validate(cfg, world_size=8)
    with pytest.raises(ConfigError, match="bf16=true needs a GPU"):
        validate(load_config(SMOKE, ["precision.bf16=true"]), cuda_available=False)
    with pytest.raises(ConfigError, match="'data.cache_dir': is required with data.source=cache"):
        validate(load_config(SMOKE, ["data.source=cache"]), world_size=2)
    with pytest.raises(ConfigError, match=r"is not a latent cache: /nonexistent/CACHE.json is missing; fill it with `python -m producer`$"):
        validate(load_config(SMOKE, ["data.source=cache", "data.cache_dir=/nonexistent"]), world_size=2)
    with pytest.raises(ConfigError, match="create it first with `python -m megatron_qwen_image.cache init DIR`"):
        validate(load_config(SMOKE, ["data.source=cache", "data.cache_dir=/nonexistent", "data.cache.streaming=true"]),
                 world_size=2)
    with pytest.raises(ConfigError, match=rf"'data.cache_dir': {SMOKE} is a file, not a latent cache directory$"):
        validate(load_config(SMOKE, ["data.source=cache", f"data.cache_dir={SMOKE}"]), world_size=2)
    with pytest.raises(ConfigError, match=r"'checkpoint.load': /nonexistent/ckpt does not exist"):  # a typo'd --load
        validate(load_config(SMOKE, ["checkpoint.load=/nonexistent/ckpt"]), world_size=2)
    validate(load_config(SMOKE, ["checkpoint.load=/nonexistent/ckpt", "checkpoint.save=/nonexistent/ckpt"]),
             world_size=2)  # the requeue idiom --save D --load D: the first run finds nothing and starts fresh


def test_base_chain_errors():
    with pytest.raises(ConfigError, match="file not found"):
        load_config(os.path.join(REPO, "configs", "nope.yaml"))


def test_cli_refuses_with_exit_code_2_and_names_the_key(monkeypatch, capsys):
    """At start-up, before any process group or model exists: also with torchrun's world size in the env."""
    from consumer.train import main

    for var, value in (("RANK", "0"), ("WORLD_SIZE", "3"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    for args, message in (
        (["parallelism.tensor_model_parallel_size=3"], "error: config key 'parallelism.tensor_model_parallel_size'"),
        ([], "error: config key 'parallelism.tensor_model_parallel_size': world size 3 is not divisible by "
             "tensor_model_parallel_size=2"),
    ):
        assert main(["--config", SMOKE, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


# ---- the shared layer (megatron_qwen_image.config), as both programs use it ----------------------
def test_base_chain_merges_key_by_key_and_names_the_file_that_set_a_bad_key(tmp_path):
    (tmp_path / "a.yaml").write_text("base: " + SMOKE + "\noptimizer: {lr: 2.0e-3}\n")
    (tmp_path / "b.yaml").write_text("base: [a.yaml]\noptimizer: {min_lr: 1.0e-4}\n")
    cfg = load_config(str(tmp_path / "b.yaml"))
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.adam_beta2) == (2e-3, 1e-4, 0.95)  # a, b, smoke
    (tmp_path / "c.yaml").write_text("base: a.yaml\noptimizer: {weight_decy: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "c.yaml"))
    assert e.value.key == "optimizer.weight_decy" and "c.yaml" in e.value.source and "did you mean" in str(e.value)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(str(tmp_path / "loop.yaml"))
    (tmp_path / "missing_base.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="file not found: .*nowhere.yaml") as e:
        load_config(str(tmp_path / "missing_base.yaml"))
    assert "missing_base.yaml" in str(e.value)


def test_yaml_syntax_error_is_one_line_with_file_and_position(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer:\n  lr: [1e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    msg = str(e.value)
    assert msg.startswith("config key 'config': YAML syntax error at ") and "bad.yaml:3:1" in msg and "\n" not in msg


def test_values_are_yaml_1_2_numbers_and_interpolations_resolve(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text(f"base: {SMOKE}\noptimizer: {{lr: 3e-4, min_lr: 3e-5}}\n"
                 "checkpoint: {save: /ckpt/run1, load: '${checkpoint.save}'}\n")
    cfg = load_config(str(f))
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.min_lr == 3e-5  # YAML 1.1 would read strings here
    assert cfg.checkpoint.load == "/ckpt/run1"


def test_flags_win_over_overrides_and_take_values_literally():
    cfg = load_config(SMOKE, ["checkpoint.save=/a"], {"checkpoint.save": "/b: c", "checkpoint.load": None})
    assert cfg.checkpoint.save == "/b: c" and cfg.checkpoint.load is None


def test_overrides_are_found_anywhere_on_a_command_line():
    from megatron_qwen_image.config import split_overrides

    argv = ["--input", "/d/a.tar", "filters.min_side=384", "/d/b=1.tar", "--cache-dir", "/c", "x=1", "--k=v"]
    assert split_overrides(argv) == (["filters.min_side=384", "x=1"],
                                     ["--input", "/d/a.tar", "/d/b=1.tar", "--cache-dir", "/c", "--k=v"])


def test_sections_of_megatron_objects_build_them():
    """The optimizer/ddp/model sections are megatron's own fields: the objects come from them unchanged."""
    cfg = load_config(SMOKE, ["optimizer.adam_eps=1e-6", "ddp.bucket_size=1000"])
    opt = cfg.optimizer_config(bf16=False)
    assert (opt.lr, opt.adam_beta2, opt.adam_eps, opt.use_distributed_optimizer) == (5e-3, 0.95, 1e-6, True)
    ddp = cfg.ddp_config(data_parallel_size=2)
    assert ddp.bucket_size == 1000 and ddp.use_distributed_optimizer and ddp.grad_reduce_in_fp32
    assert ddp.overlap_grad_reduce and ddp.overlap_param_gather  # automatic at DP > 1 (tests/test_overlap.py)
    model = cfg.model_config(bf16=False, use_cpu_initialization=True)
    assert (model.num_layers, model.hidden_size, model.axes_dims_rope, model.tensor_model_parallel_size,
            model.recompute_granularity) == (2, 64, (4, 6, 6), 2, "full")


def test_generated_key_docs_are_current():
    """docs/configuration.md and the README's section table are what `make docs` writes from the dataclasses."""
    from megatron_qwen_image.config import main

    assert main(["docs", "--check"]) == 0, "run `make docs`"
