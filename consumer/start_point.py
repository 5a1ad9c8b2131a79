"""What a training run starts from: a checkpoint it resumes, model weights it starts from, or nothing.

Decided at start-up, before any process group or model exists, from the `checkpoint` section:

* `load` (--load) is a checkpoint directory, or a checkpoint root (a --save DIR) whose `latest` (else its
  newest complete iter_* directory) is resumed;
* a `load` that does not exist, or holds no complete checkpoint yet, starts the run without one only when
  it is also `save`: the requeue idiom `--save D --load D` (launch/slurm/train.sbatch), whose first run
  finds nothing. Any other such `load` (a typo, the wrong directory, a file) is refused, naming the key;
* `pretrained` (--pretrained: model weights only) is used when `load` resumed nothing, and must hold a
  checkpoint; with `pretrained_optimizer` (--pretrained-optimizer: the hand-off between curriculum stages) it
  must be a training checkpoint, whose optimizer state is taken too. Either way the LR schedule, the step and
  the data position start fresh: a new stage reads its own cache and buckets from their beginning.

`Checkpointer.load` loads what `start_point` names; the start-up banner says which it is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from megatron.core import dist_checkpointing

from megatron_qwen_image import checkpoint_format
from megatron_qwen_image.config import ConfigError


@dataclass(frozen=True)
class StartPoint:
    resume: Optional[str] = None      # the complete checkpoint directory everything is resumed from
    pretrained: Optional[str] = None  # the checkpoint directory whose model weights the run starts from
    with_optimizer: bool = False      # and its optimizer state (checkpoint.pretrained_optimizer)

    def describe(self) -> str:
        if self.resume:
            return f"resuming {self.resume}"
        if self.pretrained and self.with_optimizer:
            return f"model weights and optimizer state from {self.pretrained} (schedule, step and data fresh)"
        if self.pretrained:
            return f"model weights from {self.pretrained} (optimizer, schedule and step fresh)"
        return "from scratch (no checkpoint loaded)"


def start_point(ck) -> StartPoint:
    """The StartPoint of the `checkpoint` config section `ck` (see module doc); ConfigError if refused."""
    if ck.pretrained_optimizer and not ck.pretrained:
        raise ConfigError("checkpoint.pretrained_optimizer", "needs checkpoint.pretrained=CKPT (--pretrained): the "
                                                             "checkpoint whose optimizer state to take")
    resume = _complete_checkpoint("checkpoint.load", ck.load) if ck.load else None
    if ck.load and resume is None and not _same_dir(ck.load, ck.save):
        what = "does not exist" if not os.path.exists(ck.load) else (
            f"holds no complete checkpoint (no {checkpoint_format.LATEST_FILE} file, no complete iter_* directory)")
        raise ConfigError("checkpoint.load", f"{ck.load} {what}; give a checkpoint root (a --save DIR) or one "
                                             f"checkpoint directory. To start fresh and resume on a rerun, pass the "
                                             f"same directory as --save and --load")
    if resume is not None or not ck.pretrained:
        return StartPoint(resume=resume)
    pretrained = _complete_checkpoint("checkpoint.pretrained", ck.pretrained)
    if pretrained is None:
        raise ConfigError("checkpoint.pretrained", f"no checkpoint found at {ck.pretrained}")
    if ck.pretrained_optimizer:
        content = dist_checkpointing.load_common_state_dict(pretrained).get("content")
        if content != "training":
            raise ConfigError("checkpoint.pretrained_optimizer", f"{pretrained} holds {content or 'no'} state, not a "
                                                                 f"training checkpoint's optimizer: it needs a checkpoint "
                                                                 f"saved by consumer.train (--save)")
    return StartPoint(pretrained=pretrained, with_optimizer=ck.pretrained_optimizer)


def _complete_checkpoint(key: str, path: str) -> Optional[str]:
    """The complete checkpoint directory `path` designates; None if it is missing or holds none yet."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(key, f"{path} is a file, not a checkpoint root or checkpoint directory")
    try:
        return checkpoint_format.resolve(path)
    except checkpoint_format.CheckpointNotFoundError as e:  # an incomplete checkpoint, or a broken `latest`
        raise ConfigError(key, str(e)) from None


def _same_dir(a: str, b: Optional[str]) -> bool:
    return b is not None and os.path.realpath(a) == os.path.realpath(b)
