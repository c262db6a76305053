"""The training stages' checkpoint files in a Ray Train run folder (``<scaling.storage_path>/<Train run name>``):
``checkpoint_<timestamp>/checkpoint.pt``, one ``torch.save`` of the worker loop's state (``pipelines.train_loop``),
and which of them is the newest that loads. No Ray here: the DAG's driver side reads them too (``pipelines.resume``).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import torch

from pipelines import storage

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_PREFIX = "checkpoint_"
"""Ray Train names each checkpoint folder ``checkpoint_<timestamp>`` (the names sort by time)."""


def latest_valid_checkpoint(train_run: storage.Location,
                            warn: Callable[[str], None]) -> tuple[str, dict] | None:
    """``(folder URI, saved state)`` of the newest ``checkpoint_*/checkpoint.pt`` under the Ray Train run folder
    ``train_run`` that ``torch.load`` reads (``weights_only``); each one that does not load is reported to ``warn``
    with its file and the error. None when there is none that loads."""
    names = storage.list_names(train_run)
    folders = sorted({name.split("/")[0] for name in names  # folders only: not checkpoint_manager_snapshot.json
                      if name.startswith(CHECKPOINT_PREFIX) and "/" in name}, reverse=True)
    for folder in folders:
        location = train_run.child(f"{folder}/{CHECKPOINT_FILE}")
        try:
            with location.filesystem.open_input_stream(location.path) as stream:
                state = torch.load(io.BytesIO(stream.read()), map_location="cpu", weights_only=True)
            epoch, step = int(state["epoch"]), int(state["step"])
        except Exception as error:  # any unreadable checkpoint (truncated zip, missing file, no epoch) is skipped
            warn(f"checkpoint {location.uri} does not load ({type(error).__name__}: "
                 f"{str(error).splitlines()[0] if str(error) else ''}): trying the previous one")
            continue
        return train_run.child(folder).uri, {**state, "epoch": epoch, "step": step}
    return None
