"""The processes of one run: who they are, how they add numbers up, and who writes.

    torchrun --nproc_per_node 2 -m gemcut train examples/distributed_sft.yaml
    python -m pytest -q tests/test_distributed.py

`start(train_cfg)` makes the run's accelerate `Accelerator` (so `accelerate launch` and `torchrun` both
work: accelerate reads the launcher's environment) with the collective timeout of
`train.distributed.timeout_s`, and wraps it in a `Group`: this process's rank, the number of processes,
sums and means over all of them, a barrier, and `main`, the one process that writes the run folder
(checkpoints, metrics, TensorBoard, final/). One process is a group of one whose collectives return their
input. `shard` applies FSDP2 (`strategy: fsdp2`); DDP is accelerate's wrapper, applied by the loop;
`lost_processes` turns a dead peer into an error naming the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from gemcut.config import TrainConfig
from gemcut.errors import TrainingError
from gemcut.models.precision import default_device

# What the collective backends say when another process of the run is gone or does not answer.
PEER_LOST = re.compile(r"gloo|nccl|connection (closed|reset|refused)|timed? ?out|broken pipe|peer", re.IGNORECASE)


@dataclass
class Group:
    """The processes of a run, as the loop, the batch sources and the validations see them."""

    accelerator: Accelerator

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        """The process that writes the run folder."""
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over all processes (every process gets it)."""
        return self.accelerator.reduce(values.to(self.device), "sum") if self.world > 1 else values

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.sum(values) / self.world

    def share(self, items: list) -> list:
        """This process's items of a list dealt round-robin: item i goes to process i mod world."""
        return items[self.rank::self.world]

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def broadcast(self, value):
        """The main process's `value` (a picklable object), on every process."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]


def micro_batch_size(train: TrainConfig, world: int) -> int:
    """Examples per forward on each process: `train.micro_batch_size`, or the global batch split evenly."""
    return train.micro_batch_size or max(1, -(-train.batch_size // world))


def sharded(train: TrainConfig, group: Group) -> bool:
    """Whether the run shards its model with FSDP2 (train.distributed.strategy=fsdp2 on several processes)."""
    return group.world > 1 and train.distributed.strategy == "fsdp2"


def shard(model: torch.nn.Module, train: TrainConfig, group: Group) -> None:
    """Shard `model` in place with torch's FSDP2 (`fully_shard`): each transformer block, then the rest. With
    sharding "full" a block's parameters are freed after its forward and gathered again for the backward;
    with "grad_op" they stay gathered in between (more memory, less communication)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from gemcut.models.adapters import find_blocks

    fsdp = train.distributed.fsdp
    kwargs = {"reshard_after_forward": fsdp.sharding == "full"}
    if fsdp.offload:
        if group.device.type != "cuda":
            raise TrainingError("train.distributed.fsdp.offload keeps GPU shards in CPU memory; on CPUs set it to false")
        kwargs["offload_policy"] = CPUOffloadPolicy()
    _, blocks = find_blocks(model)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def whole(value: torch.Tensor) -> torch.Tensor:
    """A reduced value (a gradient norm over FSDP2's shards comes as a DTensor) as a plain tensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def launched_processes() -> int:
    """How many processes the launcher started (torchrun and accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(train: TrainConfig) -> Group:
    """The run's Accelerator with `train.distributed`'s strategy, as a Group."""
    dist = train.distributed
    kwargs = {"cpu": default_device().type == "cpu",
              "kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=dist.timeout_s))]}
    # fsdp2 is applied by `shard` (torch's fully_shard), not by accelerate's plugin, which accelerate honours
    # on GPUs only: one code path shards on CPUs (tested with gloo) and GPUs alike.
    if launched_processes() > 1 and dist.strategy == "deepspeed":
        # accelerate runs DeepSpeed on GPUs only and the loop has no DeepSpeed-engine path (its clipping, its
        # checkpoints); neither could be tested where this was built. Refuse rather than run DDP silently.
        raise TrainingError("train.distributed.strategy=deepspeed is not supported yet; use fsdp2, which shards "
                            "parameters, gradients and optimizer state as ZeRO-3 does (or fsdp.sharding=grad_op, "
                            "as ZeRO-2 does)")
    return Group(Accelerator(**kwargs))



@contextlib.contextmanager
def lost_processes(group: Group, last_good: Callable[[], object]) -> Iterator[None]:
    """Within it, a collective that fails because another process of the run died, or waited past
    `train.distributed.timeout_s`, ends this process with a TrainingError naming it and the last good
    checkpoint, instead of a backend traceback (or a hang: the timeout is the process group's)."""
    if group.world == 1:
        yield
        return
    try:
        yield
    except RuntimeError as e:  # torch.distributed.DistError is one; gloo also raises plain RuntimeErrors
        if not isinstance(e, torch.distributed.DistError) and not PEER_LOST.search(str(e)):
            raise  # this process's own error (a shape, a NaN stop, memory): its message says more
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(
            f"process {group.rank} of {group.world}: the other processes of the run stopped answering ({text}); "
            f"last good checkpoint: {last_good() or 'none'}. The launcher's log names the process that failed first; "
            "fix its cause and continue with --resume (on any number of processes).") from e


def strategy_name(train: TrainConfig, group: Group) -> str:
    """What shares the work: "single process", or the strategy the processes run."""
    if group.world == 1:
        return "single process"
    strategy = train.distributed.strategy
    return "ddp" if strategy == "auto" else strategy


def launch_plan(train: TrainConfig, group: Group) -> str:
    """The resolved plan, printed before the run: processes, nodes, strategy, global and per-process batch."""
    nodes = max(1, group.world // int(os.environ.get("LOCAL_WORLD_SIZE", group.world)))
    micro = micro_batch_size(train, group.world)
    chunks = -(-train.batch_size // micro)
    per_process = -(-chunks // group.world)
    backend = f", {torch.distributed.get_backend()}" if group.world > 1 and torch.distributed.is_initialized() else ""
    return (f"launch plan: {group.world} process{'es' if group.world > 1 else ''} on {nodes} node{'s' if nodes > 1 else ''} "
            f"({strategy_name(train, group)}{backend}, {group.device.type}); global batch {train.batch_size} a step, "
            f"micro-batches of {micro}, up to {per_process} accumulated per process")
