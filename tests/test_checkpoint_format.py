"""The checkpoint directory protocol (megatron_qwen_image.checkpoint_format): `latest` only names complete
checkpoints, incomplete directories are never chosen, pruning keeps the newest k and clears killed saves."""
import os

import pytest

from megatron_qwen_image import checkpoint_format


def _fake_checkpoint(root, step, complete=True):
    path = os.path.join(root, checkpoint_format.iteration_dir_name(step))
    os.makedirs(path)
    with open(os.path.join(path, "__0_0.distcp"), "wb") as f:
        f.write(b"x" * 10)
    if complete:
        with open(os.path.join(path, checkpoint_format.MEGATRON_METADATA), "w") as f:
            f.write("{}")
        checkpoint_format.mark_complete(path, {"step": step})
    return path


def test_resolve_follows_latest_and_ignores_incomplete(tmp_path):
    root = str(tmp_path)
    assert checkpoint_format.resolve(root) is None  # empty root: nothing to resume (fresh start)
    assert checkpoint_format.resolve(str(tmp_path / "missing")) is None
    p2 = _fake_checkpoint(root, 2)
    p4 = _fake_checkpoint(root, 4)
    _fake_checkpoint(root, 6, complete=False)  # a save that was killed
    assert checkpoint_format.resolve(root) == p4  # no `latest`: the newest COMPLETE one
    checkpoint_format.write_latest(root, os.path.basename(p2))
    assert checkpoint_format.resolve(root) == p2  # `latest` decides
    assert checkpoint_format.resolve(p4) == p4  # a checkpoint directory itself
    with pytest.raises(checkpoint_format.CheckpointNotFoundError, match="incomplete"):
        checkpoint_format.resolve(os.path.join(root, "iter_0000006"))
    checkpoint_format.write_latest(root, "iter_0000006")
    with pytest.raises(checkpoint_format.CheckpointNotFoundError, match="not a complete checkpoint"):
        checkpoint_format.resolve(root)
    assert not [n for n in os.listdir(root) if ".tmp." in n]  # atomic writes leave no temp files
    marker = checkpoint_format.read_marker(p4)
    assert marker["step"] == 4 and marker["format"] == checkpoint_format.FORMAT


def test_prune_keeps_newest_and_removes_killed_saves(tmp_path):
    root = str(tmp_path)
    paths = {s: _fake_checkpoint(root, s) for s in (2, 4, 6, 8)}
    _fake_checkpoint(root, 5, complete=False)   # killed before the newest: garbage
    _fake_checkpoint(root, 10, complete=False)  # newer than the protected one (a save in progress): kept
    removed = checkpoint_format.prune(root, keep_last=2, protect=paths[8])
    assert sorted(os.path.basename(p) for p in removed) == ["iter_0000002", "iter_0000004", "iter_0000005"]
    assert [s for s, _ in checkpoint_format.complete_iterations(root)] == [6, 8]
    assert [os.path.basename(p) for p in checkpoint_format.incomplete_iterations(root)] == ["iter_0000010"]
    assert checkpoint_format.prune(root, keep_last=None, protect=paths[8]) == []


def test_iteration_names():
    assert checkpoint_format.iteration_dir_name(42) == "iter_0000042"
    assert checkpoint_format.iteration_of("/x/iter_0000042/") == 42
    assert checkpoint_format.iteration_of("release") is None
