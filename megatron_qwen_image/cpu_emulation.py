"""CPU emulation of megatron-core 0.16.1's hard-coded CUDA placements (the ONE such layer).

megatron-core's tensor-parallel layers and ``parallel_state`` run on CPU with gloo as they are, but
its ``DistributedDataParallel`` buffers, ``DistributedOptimizer``, gradient clipping, activation
recompute (``tensor_parallel.checkpoint``) and model-parallel RNG tracker hard-code CUDA:
``torch.cuda.current_device()``, ``device='cuda'`` literals, ``Tensor.type() == 'torch.cuda.FloatTensor'``
checks and CUDA RNG state get/set. So do two spots of ``dist_checkpointing``'s save path. This module
redirects exactly those placements to the CPU so that CI and laptops run the *same* training code path
as a GPU cluster, with megatron's own DDP / distributed optimizer / recompute doing the work.

How it patches (narrowly):

* Nothing in ``torch`` is touched, and no megatron module is replaced wholesale.
* A ``SourcePatch`` re-compiles ONE megatron function or method from its installed source after
  literal edits ``old -> new``; every edit states how often ``old`` occurs in that function and the
  patch refuses to apply if the count differs (so a changed megatron-core fails loudly, never
  silently). The recompiled code keeps megatron's file name and line numbers, so tracebacks point at
  the real megatron source. Methods are set back on their class; module-level functions are rebound
  in their module and wherever a ``megatron.core`` module imported that same function object by name.
* A ``FunctionSwap`` replaces a function whose whole body is CUDA-generator plumbing (the two CUDA RNG
  state helpers) by its CPU equivalent with the same signature.
* Applied only when ``torch.cuda.is_available()`` is False (``apply_if_needed``); on a GPU nothing is
  emulated. Pinned: ``apply`` refuses any megatron-core other than ``PINNED_MEGATRON_CORE``.

Under emulation the "CUDA" default generator IS the CPU default generator: the RNG tracker's forked
states, ``model_parallel_cuda_manual_seed`` and recompute's RNG save/restore all act on ``torch``'s CPU
generator, which keeps their semantics (forked streams are reproducible and restored afterwards).

Needs nothing: DDP's overlap_grad_reduce / overlap_param_gather with one distributed-optimizer instance
(megatron issues async coalesced reduce-scatters / all-gathers and waits on their handles; gloo runs them
as they are, and no CUDA stream or event is involved on that path).

Not emulated (refused elsewhere or unused here): fp16/bf16 mixed precision on CPU (CPU runs are fp32),
multiple distributed-optimizer instances (CUDA streams), NCCL user buffers, MXFP8, CUDA graphs,
optimizer CPU offload.

The table of every patch is ``PATCHES`` below; ``python -m megatron_qwen_image.cpu_emulation`` prints
it as Markdown (docs/training.md carries a copy).
"""
from __future__ import annotations

import ast
import importlib
import inspect
import sys
import textwrap
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

PINNED_MEGATRON_CORE = "0.16.1"


# --------------------------------------------------------------------------------------------------
# CPU stand-ins for the two CUDA RNG helpers of megatron/core/tensor_parallel/random.py
# --------------------------------------------------------------------------------------------------
def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """CPU version of ``random._get_cuda_rng_state``: the emulated CUDA generator is the CPU one."""
    if graph_safe:
        raise RuntimeError("graph-safe (CUDA-graph) RNG states need a GPU; the CPU emulation has none")
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """CPU version of ``random._set_cuda_rng_state``."""
    if graph_safe:
        raise RuntimeError("graph-safe (CUDA-graph) RNG states need a GPU; the CPU emulation has none")
    torch.set_rng_state(new_state)


# --------------------------------------------------------------------------------------------------
# The patch table
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    old: str
    new: str
    count: int = 1  # how often `old` occurs in the function's source at the pinned version


@dataclass(frozen=True)
class SourcePatch:
    module: str
    qualname: str
    edits: tuple[Edit, ...]
    why: str


@dataclass(frozen=True)
class FunctionSwap:
    module: str
    qualname: str
    replacement: Callable
    why: str


_CPU_DEV = Edit("device=torch.cuda.current_device()", "device='cpu'")
_TO_CPU = "device='cpu'"

PATCHES: tuple[SourcePatch | FunctionSwap, ...] = (
    # ---- DistributedDataParallel's contiguous param/grad buffers --------------------------------
    SourcePatch(
        "megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBuffer.__init__",
        (Edit("device=torch.cuda.current_device()", _TO_CPU, 3),),
        "DDP allocates its flat grad buffer (and the distributed optimizer's flat param buffer) on "
        "the current CUDA device.",
    ),
    # ---- optimizers ------------------------------------------------------------------------------
    SourcePatch(
        "megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer.__init__",
        (Edit("device='cuda'", _TO_CPU, 3),),
        "Base of DistributedOptimizer: found-inf flag, multi-tensor-apply overflow buffer and the "
        "unit loss scale are CUDA tensors.",
    ),
    SourcePatch(
        "megatron.core.optimizer.optimizer", "FP32Optimizer.__init__",
        (Edit("device='cuda'", _TO_CPU, 1),),
        "Non-distributed fp32 optimizer (use_distributed_optimizer=false): unit loss scale on CUDA.",
    ),
    SourcePatch(
        "megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups",
        (
            Edit("model_param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']",
                 "model_param.type() in ['torch.HalfTensor', 'torch.BFloat16Tensor']"),
            Edit("model_param.type() == 'torch.cuda.FloatTensor'", "model_param.type() == 'torch.FloatTensor'"),
        ),
        "Sorts params into fp32 / 16-bit groups by CUDA tensor type names; a CPU fp32 param "
        "('torch.FloatTensor') would otherwise raise TypeError.",
    ),
    SourcePatch(
        "megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__",
        (Edit("param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']",
              "param.type() in ['torch.HalfTensor', 'torch.BFloat16Tensor']"),),
        "Same CUDA type-name test when marking 16-bit params' main_param (kept consistent with the "
        "grouping above).",
    ),
    # ---- gradient norm / clipping ------------------------------------------------------------------
    SourcePatch(
        "megatron.core.optimizer.clip_grads", "get_grad_norm_fp32",
        (Edit("device='cuda'", _TO_CPU, 3),),
        "Grad-norm accumulators and the all-reduced norm are CUDA tensors.",
    ),
    SourcePatch(
        "megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
        (
            Edit("param.grad.type() == 'torch.cuda.FloatTensor'", "param.grad.type() == 'torch.FloatTensor'"),
            Edit("device='cuda'", _TO_CPU, 1),
        ),
        "Asserts fp32 grads by CUDA type name; overflow buffer on CUDA.",
    ),
    SourcePatch(
        "megatron.core.optimizer.clip_grads", "count_zeros_fp32",
        (Edit("device='cuda'", _TO_CPU, 1),),
        "Zero counter (log_num_zeros_in_grad) is a CUDA tensor.",
    ),
    SourcePatch(
        "megatron.core.utils", "local_multi_tensor_l2_norm",
        (Edit('device="cuda"', _TO_CPU, 1),),
        "The apex-free L2 norm used by get_grad_norm_fp32 returns a CUDA tensor.",
    ),
    # ---- RNG tracker and activation recompute ----------------------------------------------------
    FunctionSwap(
        "megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _cpu_get_rng_state,
        "Reads the CUDA default generator's state (used by the RNG tracker's fork and by recompute's "
        "RNG save/restore); emulated by the CPU generator.",
    ),
    FunctionSwap(
        "megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _cpu_set_rng_state,
        "Sets the CUDA default generator's state through torch.cuda._lazy_call, which without CUDA "
        "silently queues the call forever; emulated by torch.set_rng_state.",
    ),
    SourcePatch(
        "megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add",
        (
            Edit("torch.cuda.get_rng_state()", "torch.get_rng_state()", 2),
            Edit("torch.cuda.manual_seed(seed)", "torch.manual_seed(seed)", 1),
        ),
        "Creates a named RNG stream (e.g. 'model-parallel-rng') by seeding the CUDA generator.",
    ),
    SourcePatch(
        "megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.fork",
        (Edit("if not torch.all(cpu_rng_state == torch.get_rng_state()).item():",
              "if False:  # cpu_emulation: the emulated CUDA generator IS the CPU generator"),),
        "Warns when the CPU RNG moves inside a forked CUDA-RNG region; under emulation every draw in "
        "the fork moves it, so the warning would be spurious.",
    ),
    SourcePatch(
        "megatron.core.tensor_parallel.random", "model_parallel_cuda_manual_seed",
        (Edit("torch.cuda.manual_seed(data_parallel_seed)", "torch.manual_seed(data_parallel_seed)"),),
        "Seeds the default CUDA generator with the data-parallel seed.",
    ),
    # ---- sequence parallelism: the token all-gather / reduce-scatter buffers ----------------------
    SourcePatch(
        "megatron.core.tensor_parallel.mappings", "_gather_along_first_dim",
        (Edit("device=torch.cuda.current_device()", _TO_CPU, 2),),
        "All-gathers token shards (SP regions; the distributed optimizer's param gather) into a CUDA buffer.",
    ),
    SourcePatch(
        "megatron.core.tensor_parallel.mappings", "_reduce_scatter_along_first_dim",
        (Edit("device=torch.cuda.current_device()", _TO_CPU, 1),),
        "Reduce-scatters token gradients / row-parallel outputs into a CUDA buffer.",
    ),
    SourcePatch(
        "megatron.core.utils", "GlobalMemoryBuffer.get_tensor",
        (Edit("device=torch.cuda.current_device()", _TO_CPU, 1),),
        "The reusable buffer column-parallel linears all-gather their sequence-parallel input into.",
    ),
    SourcePatch(
        "megatron.core.tensor_parallel.layers", "LinearWithGradAccumulationAndAsyncCommunication.backward",
        (Edit("device=torch.cuda.current_device()", _TO_CPU, 3),),
        "Backward of megatron's linears: the reduce-scattered input gradient under sequence parallelism "
        "(and the dummy weight gradients of gradient-accumulation fusion, unused here) are CUDA tensors.",
    ),
    # ---- dist_checkpointing save path (loading needs nothing) -------------------------------------
    SourcePatch(
        "megatron.core.dist_checkpointing.strategies.filesystem_async", "FileSystemWriterAsync.preload_tensors",
        (Edit("torch.cuda.synchronize()", "None  # cpu_emulation: no device-to-host copies to wait for"),),
        "Waits for non-blocking device-to-host copies with torch.cuda.synchronize().",
    ),
    SourcePatch(
        "megatron.core.dist_checkpointing.strategies.state_dict_saver", "save_state_dict_async_finalize",
        (_CPU_DEV,),
        "Broadcasts the save-failure flag as a CUDA tensor.",
    ),
    SourcePatch(
        "megatron.core.dist_checkpointing.strategies.state_dict_saver", "verify_global_md_reuse",
        (Edit("device='cuda'", _TO_CPU, 1),),
        "All-reduces the cached-metadata check as a CUDA tensor (save with cached metadata).",
    ),
)


# --------------------------------------------------------------------------------------------------
# Machinery
# --------------------------------------------------------------------------------------------------
_APPLIED: list[str] = []


class CpuEmulationError(RuntimeError):
    pass


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def _resolve(patch: SourcePatch | FunctionSwap):
    module = importlib.import_module(patch.module)
    *owner_path, name = patch.qualname.split(".")
    owner: Any = module
    for part in owner_path:
        owner = getattr(owner, part)
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    return module, owner, name, raw


def _underlying_function(raw: Any) -> types.FunctionType:
    func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    return inspect.unwrap(func)  # through functools.wraps decorators such as torch.no_grad()


def _check_no_private_names(tree: ast.AST, where: str) -> None:
    """Recompiling a method outside its class body would skip private-name mangling (`self.__x`)."""
    for node in ast.walk(tree):
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
        if name.startswith("__") and not name.endswith("__"):
            raise CpuEmulationError(f"{where}: uses the private name {name!r}; cannot recompile it safely")


def _recompile(patch: SourcePatch, module: types.ModuleType, owner: Any, raw: Any) -> Any:
    """Re-create `raw` (decorators included) from its edited source, keeping file and line numbers."""
    func = _underlying_function(raw)
    lines, first_line = inspect.getsourcelines(func)
    source = textwrap.dedent("".join(lines))
    where = f"{patch.module}.{patch.qualname}"
    for edit in patch.edits:
        found = source.count(edit.old)
        if found != edit.count:
            raise CpuEmulationError(
                f"{where}: expected {edit.count} occurrence(s) of {edit.old!r} in megatron-core "
                f"{megatron_core_version()}, found {found}; the emulation table is out of date")
        source = source.replace(edit.old, edit.new)
    tree = ast.parse(source)
    _check_no_private_names(tree, where)
    ast.increment_lineno(tree, first_line - 1)
    definition = tree.body[0]
    # Wrap in `def factory(__class__): <definition>; return <name>` so that zero-argument super()
    # inside a method binds to the ORIGINAL class, exactly as when defined in the class body.
    factory = ast.FunctionDef(
        name="_cpu_emulation_factory",
        args=ast.arguments(posonlyargs=[], args=[ast.arg(arg="__class__")], kwonlyargs=[], kw_defaults=[],
                           defaults=[]),
        body=[definition, ast.Return(value=ast.Name(id=definition.name, ctx=ast.Load()))],
        decorator_list=[], returns=None, type_comment=None)
    for node in (factory, *factory.body[1:], factory.body[1].value):
        ast.copy_location(node, definition)
    code = compile(ast.fix_missing_locations(ast.Module(body=[factory], type_ignores=[])),
                   inspect.getsourcefile(func), "exec")
    namespace: dict[str, Any] = {}
    exec(code, module.__dict__, namespace)  # globals = the megatron module's own namespace
    return namespace["_cpu_emulation_factory"](owner if isinstance(owner, type) else None)


def _rebind_everywhere(old: Any, new: Any) -> list[str]:
    """Point every megatron.core module global that holds `old` (e.g. `from .x import f`) to `new`."""
    rebound = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("megatron.core"):
            continue
        for attr, value in list(vars(mod).items()):
            if value is old:
                setattr(mod, attr, new)
                rebound.append(f"{mod_name}.{attr}")
    return rebound


def _install(patch: SourcePatch | FunctionSwap) -> None:
    module, owner, name, raw = _resolve(patch)
    if getattr(_underlying_function(raw), "__cpu_emulated__", False):
        return
    if isinstance(patch, FunctionSwap):
        new = patch.replacement
    else:
        new = _recompile(patch, module, owner, raw)
    _underlying_function(new).__cpu_emulated__ = True
    if isinstance(owner, type):
        setattr(owner, name, new)
    else:
        _rebind_everywhere(raw, new)


def apply() -> None:
    """Install every patch in PATCHES (idempotent). Refuses megatron-core other than the pinned one."""
    version = megatron_core_version()
    if version != PINNED_MEGATRON_CORE:
        raise CpuEmulationError(
            f"megatron_qwen_image.cpu_emulation was written for megatron-core {PINNED_MEGATRON_CORE} "
            f"and refuses {version}: its patches edit that version's source. Install "
            f"megatron-core=={PINNED_MEGATRON_CORE}, or run on a GPU (no emulation needed).")
    if _APPLIED:
        return
    for patch in PATCHES:
        _install(patch)
        _APPLIED.append(f"{patch.module}.{patch.qualname}")


def apply_if_needed() -> bool:
    """Apply the emulation when no CUDA device is visible; return whether it is active."""
    if torch.cuda.is_available():
        return False
    apply()
    return True


def is_active() -> bool:
    return bool(_APPLIED)


def markdown_table() -> str:
    rows = ["| megatron-core function | change | why |", "|---|---|---|"]
    for patch in PATCHES:
        where = f"`{patch.module.removeprefix('megatron.core.')}.{patch.qualname}`"
        if isinstance(patch, FunctionSwap):
            change = f"replaced by `{patch.replacement.__name__}` (CPU generator)"
        else:
            change = "<br>".join(
                f"`{e.old}` → `{e.new}`" + (f" (×{e.count})" if e.count != 1 else "") for e in patch.edits)
        rows.append(f"| {where} | {change} | {patch.why} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
