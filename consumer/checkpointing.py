"""Checkpoints for the train loop: megatron-core dist_checkpointing (torch_dist), exact resume, resharding.

`Checkpointer(cfg, ctx)` plugs into consumer.train's seam (`load(state)` once, `maybe_save(state)` after
every step, `close()`). What a checkpoint holds (docs/checkpoints.md has the full table):

* model: `QwenImageMMDiT.sharded_state_dict()`: every tensor as a megatron ShardedTensor with its TP
  split, so the files hold GLOBAL tensors and load at any TP (and DP) layout;
* optimizer: megatron's `optimizer.sharded_state_dict(model_sd, ...)`. For the distributed optimizer the
  'fully_reshardable' format (Adam moments and fp32 main params in model space, gathered to DP rank 0 over
  gloo on save: 'mem_efficient'), the one format of megatron-core 0.16.1 that reshards across TP *and* DP
  ('dp_reshardable' reshards DP only; 'fully_sharded_model_space' needs flattened ShardedTensors, which
  0.16.1 refuses);
* common (rank 0, common.pt): LR scheduler, step, consumed samples, the data iterator's position (per DP
  rank), the parallel layout, the model's diffusers config, the training config;
* 'rng_state' (a ShardedObject per TP rank holding every DP rank's states): Python, NumPy, torch (CPU and
  CUDA) generators and megatron's model-parallel RNG tracker. Restored only when the layout is unchanged
  (other layouts have other streams; the objective does not depend on them: see consumer.train).

Saving is synchronous; `latest` moves only after the checkpoint is complete (see
megatron_qwen_image.checkpoint_format). SIGTERM (SLURM preemption) is answered by a save at the end of the
current step, agreed by all ranks, after which `maybe_save` tells the loop to stop. With
ddp.overlap_param_gather a save first all-gathers the last step's params (DDP's forward pre-hooks would
only do that in the next forward), with the hooks off, and a load runs with them off, as megatron-LM's
training loop does (`disable_pre_hooks` / `pre_hooks_disabled`).

Loading: `--load DIR` resumes everything from DIR's latest complete checkpoint (DIR may also be one
checkpoint directory); a DIR that holds none yet is accepted only as the `--save` root too (the requeue
idiom): training then starts fresh, or from `--pretrained CKPT` (model weights only, e.g. imported diffusers
weights: optimizer, schedule and step start fresh). consumer.start_point decides, at start-up.

Observer hook: every save calls `Checkpointer.on_save_phase(phase, step)` at two points (SAVE_PHASES); it
does nothing, and a subclass may watch there (the tests' fault injector, tests/dist/ckpt_fault_worker.py,
kills the rank there to check that a save interrupted at either point leaves the previous checkpoint).

The megatron-core 0.16.1 workarounds this needs (replica ids, torch Adam's 'step' state) live in
megatron_qwen_image.megatron_compat; the generators' states in consumer.rng_state.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

from consumer.rng_state import get_rng_state, rng_sharded_object, set_rng_state
from consumer.start_point import start_point
from megatron_qwen_image import checkpoint_format
from megatron_qwen_image.config import ConfigError
from megatron_qwen_image.megatron_compat import apply_tp_replica_rule, load_optimizer_state, materialize_adam_state
from megatron_qwen_image.model.diffusers_mapping import diffusers_config_from

OPTIMIZER_SHARDING = "fully_reshardable"
# The points of a save at which Checkpointer.on_save_phase is called, in order:
# 'shards-written': this rank's data files are written, the checkpoint metadata not yet;
# 'before-complete': everything is written except the completion marker and `latest`.
SAVE_PHASES = ("shards-written", "before-complete")


def _log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[checkpoint] {msg}", flush=True)


def unwrap_model(model):
    """The QwenImageMMDiT inside megatron's DDP wrapper (or the module itself)."""
    while hasattr(model, "module"):
        model = model.module
    return model


# ------------------------------------------------------------- the overlapped param all-gather's hooks
# With ddp.overlap_param_gather, megatron's DDP all-gathers the distributed optimizer's updated params in
# forward pre-hooks, bucket by bucket, during the NEXT forward: between optimizer.step() and that forward
# every DP rank holds only its own shard of the update. megatron-LM's training loop therefore syncs the
# params before a checkpoint save and keeps the hooks off around loads, evaluation and the first step.
def disable_pre_hooks(model, param_sync: bool) -> bool:
    """Turn megatron DDP's param all-gather pre-hooks off (if on); with `param_sync`, all-gather every
    bucket now (synchronously), hooks on or off, so that every DP rank holds the complete params. Returns
    whether the hooks were on. Does nothing without overlap_param_gather."""
    if not getattr(model, "use_forward_hook", False):
        return False
    enabled = bool(model.remove_forward_pre_hook_handles)
    if enabled:
        model.disable_forward_pre_hook(param_sync=param_sync)
    elif param_sync:
        model.start_param_sync(force_sync=True)
    return enabled


def enable_pre_hooks(model) -> None:
    """Turn the param all-gather pre-hooks back on (after disable_pre_hooks returned True)."""
    model.enable_forward_pre_hook()


@contextlib.contextmanager
def pre_hooks_disabled(model, param_sync: bool):
    """disable_pre_hooks for the duration; the hooks come back on afterwards if they were on."""
    enabled = disable_pre_hooks(model, param_sync)
    try:
        yield
    finally:
        if enabled:
            enable_pre_hooks(model)


def sharded_metadata() -> dict:
    """Metadata for the model's and optimizer's sharded_state_dict calls (save and load alike)."""
    return {
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
        "distrib_optim_sharding_type": OPTIMIZER_SHARDING,
        "distrib_optim_fully_reshardable_mem_efficient": True,  # gloo gather, no GPU buffers needed
        "chained_optim_avoid_prefix": True,
    }


def model_sharded_state_dict(model, metadata: Optional[dict] = None) -> dict:
    """The model's sharded state dict, with replica ids of TP-replicated tensors made per TP rank
    (megatron_compat.apply_tp_replica_rule: megatron-core 0.16.1 makes every TP rank their main replica)."""
    sd = unwrap_model(model).sharded_state_dict(metadata=metadata or sharded_metadata())
    apply_tp_replica_rule(sd)
    return sd


def load_model_weights(model, ckpt_dir: str, optimizer=None) -> dict:
    """Load only the model tensors of a checkpoint (trained or converted) into `model` at the current
    TP layout; with `optimizer`, refresh its main (fp32) params from the model. Returns the common state."""
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    _check_format(common, ckpt_dir)
    module = unwrap_model(model)
    _check_model_config(common, module, ckpt_dir)
    loaded = dist_checkpointing.load({"model": model_sharded_state_dict(module)}, ckpt_dir)
    module.load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        optimizer.reload_model_params()
    return common


def _check_format(common: dict, ckpt_dir: str) -> None:
    if common.get("format") != checkpoint_format.FORMAT:
        raise ValueError(f"{ckpt_dir}: not a megatron-qwen-image checkpoint (common.pt format="
                         f"{common.get('format')!r}, expected {checkpoint_format.FORMAT!r})")
    if common.get("format_version", 0) > checkpoint_format.FORMAT_VERSION:
        raise ValueError(f"{ckpt_dir}: checkpoint format version {common['format_version']} is newer than this "
                         f"code's {checkpoint_format.FORMAT_VERSION}")


def _check_model_config(common: dict, module, ckpt_dir: str) -> None:
    """Refuse a checkpoint of another model shape with a message naming the differing keys."""
    saved = common.get("diffusers_config")
    if not saved:
        return
    try:
        mine = diffusers_config_from(module.config)
    except ValueError:
        return
    diff = {k: (saved.get(k), v) for k, v in mine.items()
            if not k.startswith("_") and k in saved and _norm(saved.get(k)) != _norm(v)}
    if diff:
        raise ValueError(f"{ckpt_dir}: the checkpoint's model differs from the configured one "
                         f"(key: checkpoint vs config): {diff}")


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _gather_over_dp(obj) -> list:
    """`obj` of every DP rank, in DP rank order (this rank's RNG states, its data iterator's position)."""
    group = parallel_state.get_data_parallel_group()
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# ---------------------------------------------------------------------------------------------- the seam
# The param-group entries megatron's OptimizerParamScheduler takes the LR range and weight-decay factor from.
STAGE_GROUP_KEYS = ("max_lr", "min_lr", "wd_mult", "lr_mult")

class Checkpointer:
    """Save/resume for consumer.train (see module docstring), configured by the `checkpoint` section
    (save, save_interval, keep_last, load, pretrained); with neither save nor load set it does nothing."""

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        ck = cfg.checkpoint
        self.save_root: Optional[str] = ck.save
        self.save_interval: Optional[int] = ck.save_interval
        self.keep_last: Optional[int] = ck.keep_last
        self.load_path: Optional[str] = ck.load
        self.pretrained: Optional[str] = ck.pretrained
        self._sigterm = False
        self._old_handler: Any = None
        self._last_saved_step: Optional[int] = None
        if self.save_root:
            try:
                self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:  # not the main thread: leave signals alone
                self._old_handler = None

    # -------------------------------------------------------------- signals
    def _on_sigterm(self, signum, frame) -> None:
        if not self._sigterm:
            print(f"[checkpoint] rank {self.ctx.rank}: SIGTERM received; saving at the end of this step, then "
                  f"exiting", flush=True)
        self._sigterm = True

    def _stop_agreed(self) -> bool:
        """All ranks agree to stop if any got SIGTERM (they may receive it at slightly different times)."""
        flag = torch.tensor([1.0 if self._sigterm else 0.0], device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    # -------------------------------------------------------------- loading
    def load(self, state) -> bool:
        """Load what consumer.start_point names: the full state from `load`, or the model weights of
        `pretrained`. Returns True when something was loaded. The param all-gather pre-hooks are off
        meanwhile (megatron-LM loads with none of them dispatched)."""
        with pre_hooks_disabled(state.model, param_sync=False):
            return self._load_start(state)

    def _load_start(self, state) -> bool:
        start = start_point(self.cfg.checkpoint)
        if start.resume:
            self._load(state, start.resume)
            return True
        if self.load_path:
            _log(f"no checkpoint in {self.load_path} yet: starting "
                 f"{'from --pretrained ' + self.pretrained if self.pretrained else 'from scratch'}")
        if start.pretrained and start.with_optimizer:
            self._load(state, start.pretrained, resume=False)
            return True
        if start.pretrained:
            t0 = time.perf_counter()
            load_model_weights(state.model, start.pretrained, state.optimizer)
            _log(f"loaded model weights from {start.pretrained} (optimizer, LR schedule and step start fresh) "
                 f"in {time.perf_counter() - t0:.1f}s")
            return True
        return False

    def _load(self, state, path: str, resume: bool = True) -> None:
        """Load a training checkpoint: everything (`resume`), or only the model and the optimizer state (the
        hand-off to the next curriculum stage: its LR schedule, step, data position and RNG start fresh)."""
        t0 = time.perf_counter()
        ctx = self.ctx
        common = dist_checkpointing.load_common_state_dict(path)
        _check_format(common, path)
        if common.get("content") == "model":
            load_model_weights(state.model, path, state.optimizer)
            _log(f"{path} holds model weights only: loaded them; optimizer, LR schedule and step start fresh")
            return
        saved = common["layout"]
        same_layout = (saved["tp"], saved["dp"]) == (ctx.tp_size, ctx.dp_size)
        _check_model_config(common, unwrap_model(state.model), path)

        metadata = sharded_metadata()
        model_sd = model_sharded_state_dict(state.model, metadata)
        request = {"model": model_sd}
        load_optimizer = (saved["use_distributed_optimizer"] == self.cfg.optimizer.use_distributed_optimizer
                          and saved.get("optimizer_sharding") == OPTIMIZER_SHARDING)
        # What the new stage's config set in each param group (megatron's scheduler reads them there): the loaded
        # optimizer state would bring the old stage's LR range back.
        stage_keys = [{k: g[k] for k in STAGE_GROUP_KEYS if k in g} for g in state.optimizer.param_groups]
        if load_optimizer:
            materialize_adam_state(state.optimizer)
            request["optimizer"] = state.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata)
        elif not resume:  # asked for explicitly (checkpoint.pretrained_optimizer): not silently skipped
            raise ConfigError("checkpoint.pretrained_optimizer", f"{path} was saved with use_distributed_optimizer="
                                                                 f"{saved['use_distributed_optimizer']}, this run has "
                                                                 f"{self.cfg.optimizer.use_distributed_optimizer}: its "
                                                                 f"optimizer state does not load here")
        else:
            _log(f"optimizer state NOT loaded: saved with use_distributed_optimizer="
                 f"{saved['use_distributed_optimizer']}, now {self.cfg.optimizer.use_distributed_optimizer}")
        if same_layout and resume:
            request["rng_state"] = rng_sharded_object(ctx, None)
        loaded = dist_checkpointing.load(request, path)

        unwrap_model(state.model).load_state_dict(loaded["model"], strict=True)
        if load_optimizer:
            load_optimizer_state(state.optimizer, loaded["optimizer"])
        else:
            state.optimizer.reload_model_params()
        if not resume:
            # The optimizer state carries the old stage's param-group LR range and weight decay: set the new
            # stage's, then its schedule at step 0.
            for group, keys in zip(state.optimizer.param_groups, stage_keys):
                group.update(keys)
            state.scheduler.step(increment=0)
            _log(f"loaded model weights {'and optimizer state ' if load_optimizer else ''}from {path} (step "
                 f"{common['train']['step']} there) for a new stage: LR schedule, step and data start fresh, in "
                 f"{time.perf_counter() - t0:.1f}s")
            return
        try:
            state.scheduler.load_state_dict(common["scheduler"])
        except AssertionError as e:  # megatron's _check_and_set: the schedule changed since the save
            raise ConfigError("schedule", f"the LR schedule differs from the checkpoint's ({e}); resume with the "
                                          f"same optimizer.lr/min_lr, schedule.* and train.train_iters") from None
        state.step = int(common["train"]["step"])
        state.consumed_samples = int(common["train"]["consumed_samples"])
        state.extra.update(common["train"].get("extra") or {})
        self._restore_data_position(state, common.get("data_iterator"))
        if same_layout:
            set_rng_state(loaded["rng_state"][ctx.dp_rank])
        self._last_saved_step = state.step
        _log(f"resumed from {path} at step {state.step} ({state.consumed_samples} samples) in "
             f"{time.perf_counter() - t0:.1f}s"
             + ("" if same_layout else f"; resharded TP{saved['tp']}xDP{saved['dp']} -> TP{ctx.tp_size}xDP{ctx.dp_size} "
                                      f"(RNG streams start fresh)"))

    def _restore_data_position(self, state, saved: Optional[dict]) -> None:
        it = state.data_iterator
        if not saved or not saved.get("states"):
            _log("the checkpoint holds no data-iterator position: the data starts from the beginning")
            return
        if not hasattr(it, "load_state_dict"):
            _log(f"WARNING: data iterator {type(it).__name__} has no load_state_dict(): the data starts from "
                 f"the beginning, not where the checkpoint stopped")
            return
        states = saved["states"]
        # Same DP size: each rank continues its own stream. Otherwise the loaders' positions are global
        # (they all describe the same global batch sequence), so DP rank 0's serves every rank.
        mine = states[self.ctx.dp_rank] if len(states) == self.ctx.dp_size else states[0]
        if mine is None:
            _log("the checkpoint's data iterator had no state_dict(): the data starts from the beginning")
            return
        it.load_state_dict(mine)

    # -------------------------------------------------------------- saving
    def maybe_save(self, state) -> bool:
        """Save when due (every save_interval steps, at the last step, or on SIGTERM). Returns True when the
        loop must stop now (SIGTERM)."""
        if not self.save_root:
            return False
        stop = self._stop_agreed()
        due = bool(self.save_interval) and state.step % self.save_interval == 0
        final = state.step >= self.cfg.train.train_iters
        if (due or final or stop) and self._last_saved_step != state.step:
            self.save(state)
        if stop:
            _log(f"stopping after step {state.step} on SIGTERM (checkpoint saved)")
        return stop

    def _sharded_state_dict(self, state) -> dict:
        ctx, cfg = self.ctx, self.cfg
        metadata = sharded_metadata()
        model_sd = model_sharded_state_dict(state.model, metadata)
        it = state.data_iterator
        data_state = it.state_dict() if hasattr(it, "state_dict") else None
        try:
            diffusers_config = diffusers_config_from(unwrap_model(state.model).config)
        except ValueError:
            diffusers_config = None
        return {
            "model": model_sd,
            "optimizer": state.optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=metadata),
            "rng_state": rng_sharded_object(ctx, _gather_over_dp(get_rng_state())),
            # everything below is "common": written once by rank 0
            "format": checkpoint_format.FORMAT, "format_version": checkpoint_format.FORMAT_VERSION,
            "content": "training",
            "scheduler": state.scheduler.state_dict(),
            "train": {"step": state.step, "consumed_samples": state.consumed_samples, "extra": dict(state.extra)},
            "data_iterator": {"states": _gather_over_dp(data_state)},
            "layout": {"tp": ctx.tp_size, "dp": ctx.dp_size, "world_size": ctx.world_size,
                       "use_distributed_optimizer": cfg.optimizer.use_distributed_optimizer,
                       "optimizer_sharding": OPTIMIZER_SHARDING},
            "diffusers_config": diffusers_config,
            "config": cfg.to_dict(),
        }

    def save(self, state) -> str:
        """Write iter_<step>/ under the save root, mark it complete, move `latest`, prune. Collective. With
        overlap_param_gather the last step's params are all-gathered first and the pre-hooks are off
        meanwhile (as megatron-LM saves), so the model tensors written are the updated ones on every rank."""
        with pre_hooks_disabled(state.model, param_sync=True):
            return self._save(state)

    def _save(self, state) -> str:
        t0 = time.perf_counter()
        name = checkpoint_format.iteration_dir_name(state.step)
        path = os.path.join(self.save_root, name)
        if self.ctx.is_main:
            os.makedirs(self.save_root, exist_ok=True)
            if os.path.exists(path):  # left by a save that was killed (or an older run): start clean
                shutil.rmtree(path)
            os.makedirs(path)  # dist_checkpointing needs the directory to exist
        dist.barrier()

        request = dist_checkpointing.save(self._sharded_state_dict(state), path,
                                          sharded_strategy=get_default_save_sharded_strategy("torch_dist"),
                                          validate_access_integrity=True, async_sharded_save=True)
        # Run megatron's async request synchronously: write this rank's data files, barrier, then the
        # finalize steps (global .metadata and metadata.json). The 'shards-written' phase sits between the two.
        request = request._replace(finalize_fns=[lambda: self.on_save_phase("shards-written", state.step),
                                                 *request.finalize_fns])
        request.execute_sync()
        dist.barrier()
        self.on_save_phase("before-complete", state.step)
        if self.ctx.is_main:
            checkpoint_format.mark_complete(path, {"step": state.step, "consumed_samples": state.consumed_samples,
                                                   "tp": self.ctx.tp_size, "dp": self.ctx.dp_size,
                                                   "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
            checkpoint_format.write_latest(self.save_root, name)
            removed = checkpoint_format.prune(self.save_root, self.keep_last, path)
            size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            _log(f"saved {path} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s"
                 + (f"; removed {', '.join(os.path.basename(r) for r in removed)}" if removed else ""))
        dist.barrier()
        self._last_saved_step = state.step
        return path

    def on_save_phase(self, phase: str, step: int) -> None:
        """Called on every rank at each point of a save named in SAVE_PHASES, with the step being saved; does
        nothing. The place where observers hook in: the tests' fault injector overrides it to kill the rank
        there (a save interrupted at either point must leave `latest` on the previous checkpoint)."""

    def close(self) -> None:
        if self._old_handler is not None:
            try:
                signal.signal(signal.SIGTERM, self._old_handler)
            except ValueError:
                pass
            self._old_handler = None
