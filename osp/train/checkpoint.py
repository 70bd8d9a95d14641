"""Training checkpoints: ``output_dir/checkpoint-<step>`` written atomically, found, pruned.

A checkpoint is written into ``checkpoint-<step>.tmp`` by every process, completed by the main
process writing ``training_state.json`` last, and only then renamed to ``checkpoint-<step>``. A
process killed while writing leaves a ``.tmp`` folder (or one without ``training_state.json``),
which ``latest_checkpoint`` never returns and the next save of that step removes.

``training_state.json`` holds what accelerate's state does not: the step, the data position (epoch,
batches of this process's shard done in it), the seed, the world size and batch sizes the position
counts in, and the run's settings that must not change on resume.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable, Dict, List, Optional, Tuple

STATE_NAME = "training_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_SUFFIX = ".tmp"


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step}")


def is_complete(path: str) -> bool:
    """A finished checkpoint folder: named checkpoint-<step> and holding training_state.json."""
    return bool(CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))) and os.path.isfile(
        os.path.join(path, STATE_NAME))


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """(step, path) of every complete checkpoint in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path) and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The complete checkpoint with the largest step, or None (a ``.tmp`` or unfinished one never counts)."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(value: Optional[str], output_dir: str) -> Optional[str]:
    """The checkpoint folder ``--resume_from_checkpoint`` names: "latest" (None when there is none
    yet: a fresh start), a checkpoint folder, or (upstream's reading) a folder name inside
    output_dir. ValueError for a named checkpoint that is missing or unfinished."""
    if value is None or value == "":
        return None
    if value == "latest":
        return latest_checkpoint(output_dir)
    candidates = [value, os.path.join(output_dir, os.path.basename(os.path.normpath(value)))]
    for path in candidates:
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, STATE_NAME)):
                raise ValueError(f"--resume_from_checkpoint {value!r}: {path!r} has no {STATE_NAME}; expected a "
                                 "complete checkpoint-<step> folder written by osp train-t2v (an interrupted "
                                 "save leaves an incomplete one)")
            return path
    raise ValueError(f"--resume_from_checkpoint {value!r} does not exist (looked at {candidates[0]!r} and "
                     f"{candidates[1]!r}); expected 'latest' or a checkpoint-<step> folder")


def read_state(path: str) -> Dict[str, object]:
    with open(os.path.join(path, STATE_NAME), encoding="utf-8") as f:
        return json.load(f)


def begin(output_dir: str, step: int) -> str:
    """(Main process) a fresh, empty ``checkpoint-<step>.tmp``; returns its path."""
    tmp = checkpoint_dir(output_dir, step) + TMP_SUFFIX
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def finish(tmp: str, state: Dict[str, object]) -> str:
    """(Main process, after every process wrote its part into ``tmp``) write the state file last,
    then rename ``tmp`` to its final name (replacing an older checkpoint of the same step)."""
    state_path = os.path.join(tmp, STATE_NAME)
    with open(state_path + ".part", "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(state_path + ".part", state_path)
    _fsync_dir(tmp)
    final = tmp[: -len(TMP_SUFFIX)]
    if os.path.exists(final):  # a checkpoint of this step from an earlier run that was resumed before it
        old = final + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final) or ".")
    return final


def prune(output_dir: str, total_limit: Optional[int]) -> List[str]:
    """Delete the oldest complete checkpoints beyond ``total_limit``; returns the deleted paths."""
    if not total_limit:
        return []
    found = list_checkpoints(output_dir)
    doomed = [path for _, path in found[: max(0, len(found) - total_limit)]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def remove_stale(output_dir: str) -> List[str]:
    """Delete the leftovers of interrupted saves (``checkpoint-<step>.tmp`` / ``.old``); returns them."""
    if not os.path.isdir(output_dir):
        return []
    gone = []
    for name in os.listdir(output_dir):
        if re.match(r"^checkpoint-\d+\.(tmp|old)$", name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
            gone.append(name)
    return gone


def save_all(accelerator, output_dir: str, step: int, state: Dict[str, object],
             write_extra: Optional[Callable[[str], None]] = None, total_limit: Optional[int] = None,
             log: Callable[[str], None] = print) -> str:
    """The checkpoint save both trainers run, a collective (every process calls it): the main process
    prepares ``checkpoint-<step>.tmp``, every process writes accelerate's state into it and then
    ``write_extra(tmp)`` (the trainer's own files; it decides which process writes what), the main
    process completes and renames it (``finish``) and prunes to ``total_limit``. Returns the final path."""
    main = accelerator.is_main_process
    tmp = checkpoint_dir(output_dir, step) + TMP_SUFFIX
    if main:
        begin(output_dir, step)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if write_extra is not None:
        write_extra(tmp)
    accelerator.wait_for_everyone()
    final = checkpoint_dir(output_dir, step)
    if main:
        final = finish(tmp, state)
        for gone in prune(output_dir, total_limit):
            log(f"removed {gone} (--checkpoints_total_limit {total_limit})")
    accelerator.wait_for_everyone()
    return final
