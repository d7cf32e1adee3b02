"""The job's progress as a checkpoint state object (pipeline.train.checkpoint.Stateful)."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class TrainState:
    """The job's progress, the same on every rank (a checkpoint state object)."""
    step: int = 0          # optimizer steps done
    epoch: int = 0
    run_id: str | None = None  # the MLflow run a resume continues

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.run_id = state["step"], state["epoch"], state.get("run_id")
