"""The loss log of a run: ``save/losses.csv`` (one row per logged step) and TensorBoard when installed.

Each row is appended with one ``write`` and flushed, so a killed run keeps every earlier row (at
worst its last line is cut short; an append that fails, on a full disk, is cut back). A resumed run
continues the file: rows after the checkpoint's step (logged by the killed run, about to be redone) and
a cut-short last line are dropped first.
A column that appears later (a loss whose weight schedule starts above 0) rewrites the file once,
atomically, with the wider header; earlier rows leave that cell empty.
"""

from __future__ import annotations

import csv
import io as _io
import logging
import os
from typing import Optional

from lift3d.utils import io

log = logging.getLogger("lift3d")


def _csv_line(values: list) -> str:
    buf = _io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


class LossLog:
    def __init__(self, path: str, resume_step: Optional[int] = None, tensorboard_dir: Optional[str] = None):
        """A fresh log at ``path``, or with ``resume_step`` the existing one up to that step."""
        self.path = path
        self.columns: list = []
        self.rows: list = []           # kept only to rewrite the file when a column appears
        if resume_step is not None and os.path.isfile(path):
            self._load(resume_step)
        self._rewrite()
        self.writer = _tensorboard(tensorboard_dir) if tensorboard_dir else None

    def _load(self, resume_step: int) -> None:
        with open(self.path, newline="") as f:
            text = f.read()
        if not text.endswith("\n"):                      # a line cut short by a kill
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(_io.StringIO(text))
        self.columns = [c for c in (reader.fieldnames or []) if c != "step"]
        try:
            self.rows = [r for r in reader if int(float(r["step"])) <= resume_step]
        except (KeyError, TypeError, ValueError):
            log.warning("%s is not a loss log lift3d can continue; starting a new one", self.path)
            self.columns, self.rows = [], []

    def _rewrite(self) -> None:
        text = _csv_line(["step", *self.columns])
        text += "".join(_csv_line([r.get("step", "")] + [r.get(c, "") for c in self.columns]) for r in self.rows)
        io.write_text(self.path, text)

    def append(self, step: int, scalars: dict) -> None:
        """Log ``{name: number}`` at ``step``."""
        row = {"step": str(step), **{k: f"{float(v):.6g}" for k, v in scalars.items()}}
        new = [k for k in scalars if k not in self.columns]
        self.rows.append(row)
        if new:
            self.columns += new
            self._rewrite()
        else:
            io.append_text(self.path, _csv_line([row["step"]] + [row.get(c, "") for c in self.columns]))
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"train/{k}", float(v), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _tensorboard(log_dir: str):
    """A SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=log_dir)
