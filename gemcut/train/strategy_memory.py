"""Per-device memory of a run on N processes under each way of sharing the model: DDP, FSDP2, ZeRO.

    gemcut estimate examples/sft_chatterbot.yaml --processes 4
    python -m pytest -q tests/test_estimate.py -k strateg

The inputs are the one-process parts of `gemcut/train/estimate.py`: W weights (every unique parameter at its
dtype, frozen ones included), G gradients (trainable parameters), O optimizer state (AdamW, 8 bytes per
trainable parameter), and A the activations of one process's micro-batch at N processes (the one-process
figure x micro_batch_size(train, N) / micro_batch_size(train, 1): activations grow with the rows of a
micro-batch). Frozen parameters (LoRA's base, freeze's lower blocks) have no gradient and no optimizer state,
but FSDP2 and ZeRO-3 shard them like any other weight. Two more sizes come from the model's structure: K, the
parameters of its largest transformer block (`find_blocks`), and R, those outside the blocks (embeddings,
final norm, head: FSDP2's root unit). Per device, with N > 1:

| strategy | weights | gradients | optimizer | also |
|---|---|---|---|---|
| ddp | W | G | O | buffers G: DDP's reducer keeps every gradient again in its all-reduce buckets (torch's and accelerate's default `gradient_as_bucket_view=False`; torch's docs: the saving of True "will be equal to the total gradients size") |
| fsdp2 full | W/N | G/N | O/N | gathered R + 2K: the root stays gathered from forward to backward (FSDP2 does not reshard the root after forward), the block computing and the next one prefetched |
| fsdp2 grad_op | W/N | G/N | O/N | gathered W: parameters stay gathered from forward to backward, so at the end of the forward every unit is |
| zero-1 | W | G | O/N | |
| zero-2 | W | G/N | O/N | |
| zero-3 | W/N | G/N | O/N | gathered 2 max(R, K): DeepSpeed gathers module by module, the one computing and the one prefetched |

and A activations in every row. Offload, where the config turns it on, adds a row for the configured
variant with the offloaded parts in host memory (`offloaded`) instead of on the device: FSDP2 offload keeps
its shards W/N + G/N + O/N there (the device holds the gathered parameters and the activations); ZeRO
offload keeps O/N there, and at stage 3 also W/N and G/N. Not counted: DeepSpeed's own reduce and prefetch
buckets (sized by its config, about hidden^2 values), the unsharded gradient of the block in flight before
its reduce-scatter, allocator fragmentation, and NCCL's buffers. One process runs no strategy
(`distributed.start` uses no plugin for one), so with N = 1 every row is W + G + O + A.

Fits: on a GPU each process has its own device, so a row fits when its device bytes fit in the device's free
memory and its offloaded bytes, times the processes on this machine, in the host's. On a CPU the processes of
this machine (LOCAL_WORLD_SIZE under a launcher, else all N) share one memory: device and offloaded bytes
times the processes must fit in it.
"""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("ddp", "fsdp2 full", "fsdp2 grad_op", "zero-1", "zero-2", "zero-3")
OFFLOAD = " + offload"


@dataclass(frozen=True)
class ModelBytes:
    """One process's parts (see the module docstring): all of them in bytes."""

    weights: int  # W
    gradients: int  # G
    optimizer: int  # O
    activations: int  # A, one process's micro-batch at the processes counted
    root: int  # R, parameters outside the transformer blocks
    largest_block: int  # K


@dataclass
class StrategyMemory:
    """Bytes per process under one strategy; `device_bytes` is what the accelerator (or, on a CPU, the
    process) holds, `offloaded` what offload keeps in host memory instead."""

    name: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    gathered: int  # parameters gathered from their shards while a unit computes
    buffers: int  # DDP's all-reduce buckets
    offloaded: int
    device_bytes: int
    fits: bool
    configured: bool


def configured_strategy(distributed) -> str:
    """The row of `train.distributed` (DistributedConfig): "ddp" for auto and ddp, "fsdp2 <sharding>",
    "zero-<stage>", with " + offload" where it is on."""
    if distributed.strategy == "fsdp2":
        return f"fsdp2 {distributed.fsdp.sharding}" + (OFFLOAD if distributed.fsdp.offload else "")
    if distributed.strategy == "deepspeed":
        return f"zero-{distributed.deepspeed.zero_stage}" + (OFFLOAD if distributed.deepspeed.offload else "")
    return "ddp"


def strategy_names(distributed) -> list[str]:
    """Every strategy, and the offload variant of the FSDP2 sharding or ZeRO stage the config names where
    the config turns offload on."""
    names = list(STRATEGIES)
    if distributed.fsdp.offload:
        names.append(f"fsdp2 {distributed.fsdp.sharding}" + OFFLOAD)
    if distributed.deepspeed.offload:
        names.append(f"zero-{distributed.deepspeed.zero_stage}" + OFFLOAD)
    return names


def parts(name: str, m: ModelBytes, processes: int) -> dict[str, int]:
    """Per-process bytes of `name` (a STRATEGIES entry, optionally + OFFLOAD) by part, per the module docstring."""
    n = processes
    if n == 1:  # no strategy runs on one process
        return dict(weights=m.weights, gradients=m.gradients, optimizer=m.optimizer, gathered=0, buffers=0, offloaded=0)
    offload = name.endswith(OFFLOAD)
    base = name.removesuffix(OFFLOAD)
    shard = lambda b: -(-b // n)  # noqa: E731  (the largest shard: ceil)
    if base == "ddp":
        p = dict(weights=m.weights, gradients=m.gradients, optimizer=m.optimizer, gathered=0, buffers=m.gradients)
    elif base in ("fsdp2 full", "fsdp2 grad_op"):
        gathered = m.root + 2 * m.largest_block if base == "fsdp2 full" else m.weights
        p = dict(weights=shard(m.weights), gradients=shard(m.gradients), optimizer=shard(m.optimizer),
                 gathered=gathered, buffers=0)
    elif base in ("zero-1", "zero-2", "zero-3"):
        stage = int(base[-1])
        p = dict(weights=shard(m.weights) if stage == 3 else m.weights,
                 gradients=shard(m.gradients) if stage >= 2 else m.gradients, optimizer=shard(m.optimizer),
                 gathered=2 * max(m.root, m.largest_block) if stage == 3 else 0, buffers=0)
    else:
        raise ValueError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}")
    # What offload moves to host memory: FSDP2 all its shards; ZeRO the optimizer state, at stage 3 all shards.
    if not offload:
        moved = ()
    elif base.startswith("fsdp2") or base == "zero-3":
        moved = ("weights", "gradients", "optimizer")
    else:
        moved = ("optimizer",)
    p["offloaded"] = sum(p[k] for k in moved)
    p.update({k: 0 for k in moved})
    return p


def strategy_table(m: ModelBytes, processes: int, distributed, *, device: str, available: int,
                   host_available: int | None = None, local_processes: int | None = None) -> list[StrategyMemory]:
    """A row per strategy of `strategy_names(distributed)` with its per-process bytes and whether it fits
    (see the module docstring); the row of `configured_strategy(distributed)` is marked `configured`.

    `available`: free bytes of the device (GPU free memory, or the machine's available memory on a CPU);
    `host_available`: the host's, for offloaded bytes on a GPU (default `available`); `local_processes`: the
    processes sharing this machine (default all of them)."""
    local = local_processes or processes
    host = available if host_available is None else host_available
    chosen = configured_strategy(distributed)
    rows = []
    for name in strategy_names(distributed):
        p = parts(name, m, processes)
        device_bytes = p["weights"] + p["gradients"] + p["optimizer"] + m.activations + p["gathered"] + p["buffers"]
        if device == "cpu":
            fits = (device_bytes + p["offloaded"]) * local <= available
        else:
            fits = device_bytes <= available and p["offloaded"] * local <= host
        rows.append(StrategyMemory(name=name, activations=m.activations, device_bytes=device_bytes, fits=fits,
                                   configured=name == chosen, **p))
    return rows


def unit_bytes(model) -> tuple[int, int]:
    """(R, K): bytes of the parameters outside the transformer blocks, and of the largest block; a model
    without a list of blocks is one unit (R = all of it, K = 0)."""
    from gemcut.errors import ConfigError
    from gemcut.models.adapters import find_blocks

    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in unique.values())
    try:
        _, blocks = find_blocks(model)
    except ConfigError:
        return total, 0
    in_blocks, largest = set(), 0
    for block in blocks:
        own = {id(p): p for p in block.parameters()}
        in_blocks |= own.keys()
        largest = max(largest, sum(p.numel() * p.element_size() for p in own.values()))
    root = sum(p.numel() * p.element_size() for i, p in unique.items() if i not in in_blocks)
    return root, largest
