"""Checkpoints that survive faults: every worker saves (non-chief workers to a temporary directory that is
removed), a restore falls back past unreadable checkpoints and sets them aside, and a failed save names the
reason (e.g. a full disk) while the previous checkpoint stays the latest.

TensorFlow writes a checkpoint's data to `<prefix>_temp/`, then the index, then the `checkpoint` state file
atomically: a process killed mid-save leaves the previous checkpoint as the latest.
"""
import glob
import os
import re
import shutil
import tempfile
from typing import Callable, Optional

import tensorflow as tf


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written, in one line with what to do."""


def _reason(e: Exception) -> str:
    """The short cause of a TF or OS error: 'No space left on device', 'Data loss: ...'."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = (getattr(e, "message", None) or str(e)).splitlines()[0] if str(e) else type(e).__name__
    return text.split("; ")[-1].split(" [Op:")[0].strip() or type(e).__name__


class Checkpointer:
    """Restores the newest good checkpoint of `<run_dir>/checkpoints` and saves new ones.

    The chief saves to `<run_dir>/checkpoints`; other workers (MultiWorkerMirroredStrategy needs every worker
    in each save) to a temporary directory that is emptied after each save and removed by `close()`.
    """

    def __init__(self, checkpoint: tf.train.Checkpoint, run_dir, chief: bool, keep: int,
                 log: Callable[[str], None]):
        self.checkpoint, self.chief, self.keep, self.log = checkpoint, chief, keep, log
        self.directory = os.path.join(run_dir, "checkpoints")
        self.save_dir = self.directory if chief else tempfile.mkdtemp(prefix="cud_tf_worker_ckpt_")
        self.manager = None  # created after `restore`, which may drop unreadable checkpoints from the state
        self.latest = None  # path of the newest good checkpoint, restored or saved

    def restore(self) -> Optional[str]:
        """Restores the newest checkpoint that loads and returns its path (None: nothing to restore).

        An unreadable one (truncated, corrupted, missing files) is reported by name and, on the chief, moved
        to `checkpoints/corrupt/` and dropped from the state file, so that later saves never rotate the good
        one out in its favour. Raises CheckpointError when none loads.
        """
        candidates, bad = self._candidates(), []
        for path in reversed(candidates):
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except Exception as e:  # noqa: BLE001 -- truncated files raise IndexError, others OpError/ValueError
                bad.append(f"{os.path.basename(path)}: {_reason(e)}")
                self.log(f"warning: checkpoint {path} is unreadable ({_reason(e)}); trying the previous one")
                if self.chief:
                    self._set_aside(path, [p for p in candidates if p != path])
                    candidates = [p for p in candidates if p != path]
                continue
            self.latest = path
            break
        if bad and self.latest is None:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored ({'; '.join(bad)}); train with the flags of "
                f"this run (--flagfile=<run_dir>/flags.txt) or use a new --run_dir")
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.save_dir, max_to_keep=self.keep)
        return self.latest

    def _candidates(self):
        """Checkpoint paths, oldest first: from the state file, or from the index files when it is unreadable."""
        try:
            state = tf.train.get_checkpoint_state(self.directory)
        except Exception as e:  # a corrupted state file: text_format.ParseError or an OpError
            self.log(f"warning: {os.path.join(self.directory, 'checkpoint')} is unreadable ({_reason(e)}); "
                     "looking for checkpoints by their index files")
            found = glob.glob(os.path.join(glob.escape(self.directory), "ckpt-*.index"))
            numbered = [(int(m.group(1)), f[:-len(".index")]) for f in found
                        if (m := re.search(r"ckpt-(\d+)\.index$", f))]
            candidates = [path for _, path in sorted(numbered)]
            if self.chief:  # rewrite it, so that the manager can read it
                if candidates:
                    tf.compat.v1.train.update_checkpoint_state(self.directory, candidates[-1], candidates)
                else:
                    os.remove(os.path.join(self.directory, "checkpoint"))
            return candidates
        if state is None:
            return []
        candidates = list(state.all_model_checkpoint_paths)
        if state.model_checkpoint_path not in candidates:
            candidates.append(state.model_checkpoint_path)
        return candidates

    def _set_aside(self, path, remaining):
        """Moves `path`'s files to `checkpoints/corrupt/` and rewrites the state file without it."""
        corrupt = os.path.join(self.directory, "corrupt")
        os.makedirs(corrupt, exist_ok=True)
        for f in glob.glob(glob.escape(path) + ".*"):
            target = os.path.join(corrupt, os.path.basename(f))
            while os.path.exists(target):
                target += ".old"
            os.replace(f, target)
        if remaining:
            tf.compat.v1.train.update_checkpoint_state(self.directory, remaining[-1], remaining)
        else:
            os.remove(os.path.join(self.directory, "checkpoint"))

    def save(self, step: int) -> str:
        """Writes checkpoint `ckpt-<step>`; on failure removes the partial files and raises CheckpointError,
        the previous checkpoint staying the latest."""
        if self.manager is None:  # nothing was restored
            self.manager = tf.train.CheckpointManager(self.checkpoint, self.save_dir, max_to_keep=self.keep)
        try:
            path = self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as e:
            for partial in glob.glob(os.path.join(glob.escape(self.save_dir), f"ckpt-{step}_temp*")):
                shutil.rmtree(partial, ignore_errors=True)
            where = os.path.join(self.directory, f"ckpt-{step}")
            previous = f"resume from {self.latest}" if self.latest else "start again"
            raise CheckpointError(
                f"cannot write checkpoint {where}: {_reason(e)}; free space on that disk (or lower "
                f"--keep_checkpoints) and rerun the same command to {previous}") from None
        if self.chief:
            self.latest = path
        else:
            self._empty_save_dir()
        return path

    def _empty_save_dir(self):
        for name in os.listdir(self.save_dir):
            full = os.path.join(self.save_dir, name)
            shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)

    def close(self):
        """Removes a non-chief worker's temporary directory."""
        if not self.chief:
            shutil.rmtree(self.save_dir, ignore_errors=True)
