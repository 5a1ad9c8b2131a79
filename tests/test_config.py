"""Config loading, overrides, and refusal of bad values at start-up with a message naming the key."""
import os

import pytest

from megatron_qwen_image.config import ConfigError, load_config, validate
from tests.torchrun import REPO

SMOKE = os.path.join(REPO, "configs", "smoke_tp2.yaml")


def test_smoke_config_inherits_the_tiny_model_and_overrides_apply():
    cfg = load_config(SMOKE, ["lr=3e-3", "model.num_layers=3", "recompute_num_layers=2"])
    assert cfg.model.hidden_size == 64 and cfg.model.axes_dims_rope == [4, 6, 6]  # from model/tiny.yaml
    assert cfg.tensor_model_parallel_size == 2  # the smoke file overrides tiny.yaml's TP=1
    assert cfg.lr == 3e-3 and cfg.model.num_layers == 3 and cfg.recompute_num_layers == 2


def test_all_shipped_configs_load():
    for name in ("model/tiny.yaml", "model/qwen_image_20b.yaml", "smoke_tp2.yaml", "stage_256p.yaml"):
        load_config(os.path.join(REPO, "configs", name))


@pytest.mark.parametrize("overrides, key, words", [
    (["lerning_rate=1e-3"], "lerning_rate", "unknown key"),
    (["model.num_layer=3"], "model.num_layer", "did you mean 'model.num_layers'"),
    (["tensor_model_parallel_size=3"], "tensor_model_parallel_size", "does not divide model.num_attention_heads=4"),
    (["recompute_granularity=partial"], "recompute_granularity", "must be one of"),
    (["recompute_method=null"], "recompute_method", "must be 'uniform' or 'block'"),
    (["recompute_num_layers=5"], "recompute_num_layers", "must be in [1, model.num_layers=2]"),
    (["recompute_granularity=selective"], "recompute_method", "only applies to recompute_granularity=full"),
    (["global_batch_size=5"], "global_batch_size", "not a multiple of micro_batch_size=2"),
    (["lr=fast"], "lr", "must be a number"),
    (["train_iters=1.5"], "train_iters", "must be an integer"),
    (["use_distributed_optimizer=maybe"], "use_distributed_optimizer", "must be true or false"),
    (["min_lr=1.0"], "min_lr", "must be in [0, lr="),
    (["lr_warmup_iters=20"], "lr_warmup_iters", "must be in [0, lr_decay_iters=20)"),
    (["model.axes_dims_rope=[4, 4, 4]"], "model.axes_dims_rope", "must sum to the head dim"),
    (["model.hidden_size=66"], "model.hidden_size", "not divisible by model.num_attention_heads"),
    (["recompute_granularity=selective", "recompute_method=null", "recompute_num_layers=null",
      "recompute_modules=[moe]"], "recompute_modules", "choose from"),
    (["recompute_modules=[mlp]"], "recompute_modules", "only applies to recompute_granularity=selective"),
    (["timestep_shift=dynamo"], "timestep_shift", "must be one of"),
    (["synthetic_resolutions=[[64, 60]]"], "synthetic_resolutions", "divisible by 16"),
    (["model=3"], "model", "must be a mapping"),
    (["lr"], "lr", "key=value"),
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
        validate(load_config(SMOKE, ["bf16=true"]), cuda_available=False)
    with pytest.raises(ConfigError, match="'cache_dir': is required with data=cache"):
        validate(load_config(SMOKE, ["data=cache"]), world_size=2)
    with pytest.raises(ConfigError, match=r"is not a latent cache: /nonexistent/CACHE.json is missing; fill it with `python -m producer`$"):
        validate(load_config(SMOKE, ["data=cache", "cache_dir=/nonexistent"]), world_size=2)
    with pytest.raises(ConfigError, match="create it first with `python -m megatron_qwen_image.cache init DIR`"):
        validate(load_config(SMOKE, ["data=cache", "cache_dir=/nonexistent", "cache_streaming=true"]), world_size=2)


def test_base_chain_errors():
    with pytest.raises(ConfigError, match="file not found"):
        load_config(os.path.join(REPO, "configs", "nope.yaml"))


def test_cli_refuses_with_exit_code_2_and_names_the_key(monkeypatch, capsys):
    """At start-up, before any process group or model exists: also with torchrun's world size in the env."""
    from consumer.train import main

    for var, value in (("RANK", "0"), ("WORLD_SIZE", "3"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    for args, message in (
        (["tensor_model_parallel_size=3"], "error: config key 'tensor_model_parallel_size'"),
        ([], "error: config key 'tensor_model_parallel_size': world size 3 is not divisible by "
             "tensor_model_parallel_size=2"),
    ):
        assert main(["--config", SMOKE, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
