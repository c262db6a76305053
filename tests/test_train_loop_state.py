"""The training loop's checkpoint of an objective's own state (``train(stateful=...)``): what ``gather_states``
writes is what ``restore_state`` gives back to the rank, through ``torch.save`` / ``torch.load(weights_only=True)``;
a checkpoint without it, or from another number of workers, leaves the objective fresh and says so."""

from __future__ import annotations

import io

import torch

from pipelines.train_loop import WorkerInfo, gather_states, restore_state


class Counter:
    """A stateful objective's stand-in: a step count and a running buffer."""

    def __init__(self) -> None:
        self.step, self.buffer = 0, torch.zeros(3)

    def advance(self) -> None:
        self.step += 1
        self.buffer += torch.arange(3.0) * self.step

    def state_dict(self) -> dict:
        return {"step": self.step, "buffer": self.buffer.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.buffer = int(state["step"]), state["buffer"].clone()


ONE_WORKER = WorkerInfo(rank=0, world_size=1, device=torch.device("cpu"))


def test_a_checkpointed_state_is_restored_to_its_rank(capsys) -> None:
    trained = Counter()
    for _ in range(3):
        trained.advance()
    buffer = io.BytesIO()
    torch.save({"stateful": gather_states(trained, ONE_WORKER)}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = Counter()
    restore_state(resumed, checkpoint["stateful"], ONE_WORKER)
    assert resumed.step == 3 and torch.equal(resumed.buffer, torch.tensor([0.0, 6.0, 12.0]))
    assert capsys.readouterr().out == ""
    assert gather_states(None, ONE_WORKER) is None


def test_a_checkpoint_without_the_state_or_of_other_workers_leaves_it_fresh_and_says_so(capsys) -> None:
    trained = Counter()
    trained.advance()
    for states, said in ((None, "holds no state for 1 workers"),
                         (gather_states(trained, ONE_WORKER) * 2, "holds the state of 2 workers for 1 workers")):
        fresh = Counter()
        restore_state(fresh, states, ONE_WORKER)
        assert fresh.step == 0 and not fresh.buffer.any()
        assert said in capsys.readouterr().out
