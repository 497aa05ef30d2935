"""Many processes train like one: real `gemcut train` runs under torchrun on CPU (gloo), against one process.

    python -m pytest -q tests/test_distributed.py

Each test launches `python -m gemcut train` (one process) and `python -m torch.distributed.run ... -m gemcut
train` (several) on the tiny models of tests/tiny.py, with the same global `train.batch_size`, and compares
what the runs wrote: every per-step metric of metrics.jsonl (loss, grad_norm, token counts, validation
loss, rewards) and the weights of final/. Runs shared by several tests are launched once per module
(`Lab.run`). Helpers: tests/distributed_helpers.py. docs/distributed.md says what these tests prove.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from distributed_helpers import (  # noqa: E402
    final_weights,
    launch,
    metric_rows,
    start,
    train_rows,
    val_rows,
    worker_of_rank,
    write_inputs,
)

from gemcut.run_folder import latest_checkpoint  # noqa: E402


def timing(key: str) -> bool:
    """Metrics that measure the machine, not the training (elapsed_s, gen_s, tokens_per_s): they differ
    from run to run."""
    return key.endswith("_s")


# Weights after Adam: rtol 1e-5 as for the losses, plus an absolute slack. The processes add the same
# gradients in another order (each process sums its micro-batch, then gloo sums the processes), so a
# gradient agrees to about 1e-7 relative; Adam divides each gradient by the root of its running square, so
# on a weight whose gradient is near zero (|g| ~ Adam's eps 1e-8) that rounding becomes a visible share of
# an update of size lr (1e-2). Measured after 4 steps: largest differences 2.5e-6 (LoRA SFT), 3e-7 (DPO),
# 4.6e-6 (the BERT classifier, full fine-tuning), 1.3e-6 (FSDP2, full), on weights of size ~1e-2 to 1.
WEIGHT_ATOL = 1e-5


class Lab:
    """The module's folder of inputs (distributed_helpers.write_inputs) and the runs launched in it."""

    def __init__(self, folder: Path):
        self.folder, self.outputs = folder, {}

    def run(self, name: str, config: str, processes: int = 1, *overrides: str, timeout: float = 240) -> Path:
        """runs/<name>: the run of `config` on `processes` processes, launched the first time it is asked for."""
        if name not in self.outputs:
            rc, output = launch(self.folder, config, [f"output.name={name}", *overrides], processes=processes, timeout=timeout)
            assert rc == 0, f"{name} exited {rc}:\n{output[-6000:]}"
            self.outputs[name] = output
        return self.folder / "runs" / name


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    return Lab(write_inputs(tmp_path_factory.mktemp("distributed")))


def assert_one_writer(run_dir: Path, output: str) -> None:
    """Each metric line written once (one process writes metrics.jsonl), each step printed once, and the run
    folder's path (the command's result line) printed once."""
    keys = [(r["step"], r.get("split")) for r in metric_rows(run_dir)]
    assert len(re.findall(rf"^{re.escape(str(run_dir))}$", output, re.MULTILINE)) <= 1, f"run folder printed twice:\n{output}"
    assert len(keys) == len(set(keys)), f"duplicated metric lines in {run_dir}/metrics.jsonl: {keys}"
    for step in {k[0] for k in keys if k[1] is None}:
        assert len(re.findall(rf"^step {step}  epoch ", output, re.MULTILINE)) <= 1, f"step {step} printed twice:\n{output}"


def assert_same_metrics(one: dict[int, dict], many: dict[int, dict], steps=None, atol: float = 1e-7) -> None:
    """Every metric of every step (of `steps`, default all) equal to rtol 1e-5 (and `atol`); counts exactly."""
    steps = sorted(one) if steps is None else list(steps)
    assert set(steps) <= set(one) and set(steps) <= set(many), (sorted(one), sorted(many))
    for step in steps:
        a, b = one[step], many[step]
        assert set(a) == set(b), (step, sorted(a), sorted(b))
        for key in sorted(k for k in a if not timing(k)):
            if not isinstance(a[key], float):
                assert a[key] == b[key], (step, key, a[key], b[key])  # token and target counts, the split
            else:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=atol), (step, key, a[key], b[key])


def assert_same_weights(one: Path, many: Path) -> None:
    a, b = final_weights(one), final_weights(many)
    assert a.keys() == b.keys()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=WEIGHT_ATOL)


def assert_same_training(lab: Lab, one: Path, many: Path, atol: float = 1e-7) -> None:
    assert_same_metrics(train_rows(one), train_rows(many), atol=atol)
    assert_same_metrics(val_rows(one), val_rows(many), atol=atol)
    assert_same_weights(one, many)
    assert_one_writer(many, lab.outputs.get(many.name, ""))


@pytest.mark.parametrize("objective", ["sft", "classify", "dpo"])
def test_two_processes_train_like_one(lab, objective):
    """LoRA SFT (tiny Llama), full fine-tuning of a classifier (tiny BERT, dropout 0) and LoRA DPO: the
    global batch of 8 is 4 examples a process on 2 processes, 8 on one; the losses, gradient norms, token
    counts, validation loss and final weights agree."""
    one = lab.run(f"{objective}-1", f"{objective}.yaml", 1)
    many = lab.run(f"{objective}-2", f"{objective}.yaml", 2)
    assert "launch plan: 2 processes on 1 node (ddp, gloo, cpu); global batch 8 a step, micro-batches of 4" in lab.outputs[many.name]
    assert sorted(train_rows(many)) == [1, 2, 3, 4]
    assert_same_training(lab, one, many)


def test_accelerate_launch_trains_like_one_process(lab):
    """`accelerate launch --multi_gpu --num_processes 2 -m gemcut train` (accelerate's launcher, CPUs here):
    the same run as one process."""
    one = lab.run("sft-1", "sft.yaml", 1)
    name = "sft-2-accelerate"
    rc, output = launch(lab.folder, "sft.yaml", [f"output.name={name}"], processes=2, accelerate=True)
    assert rc == 0, output[-6000:]
    assert "launch plan: 2 processes on 1 node (ddp, gloo, cpu)" in output
    lab.outputs[name] = output
    assert_same_training(lab, one, lab.folder / "runs" / name)


def test_grpo_on_two_processes_samples_and_scores_like_one(lab):
    """GRPO with a classifier reward (the 1-process classify run): each completion is sampled from a seed
    of its prompt's place in the step (train/rollouts.py row_seeds), so 2 processes draw the same
    completions as 1, and the rewards, KL and losses of each step agree.

    The KL (and the entropy) are means of per-token log-probabilities of size ~6, each known to float32's
    spacing there (4.8e-7): the KL, a small difference of two of them, agrees to ~2e-7 absolute, not to
    1e-5 relative of itself; hence atol 1e-6. Rewards and losses agree to the last bit here."""
    lab.run("classify-1", "classify.yaml", 1)  # the reward model
    one = lab.run("grpo-1", "grpo.yaml", 1)
    many = lab.run("grpo-2", "grpo.yaml", 2)
    rows = train_rows(many)
    assert sorted(rows) == [1, 2, 3] and all("reward_mean" in r for r in rows.values())
    assert_same_training(lab, one, many, atol=1e-6)


def test_a_two_process_run_resumes_on_one_process(lab):
    """The 2-process SFT run, as if killed after its step-2 checkpoint, continued on ONE process with
    --resume: steps 3-4 and the final weights are the straight run's (the global batch is the same, so
    the data order and the optimizer state carry over)."""
    straight = lab.run("sft-2", "sft.yaml", 2)
    resumed = lab.folder / "runs" / "sft-2-then-1"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    shutil.rmtree(resumed / "final")
    rc, output = launch(lab.folder, "sft.yaml", [f"output.name={resumed.name}"], processes=1, resume=True)
    assert rc == 0, output[-6000:]
    assert "launch plan: 1 process" in output
    # it continued from step-2, not from the start (which would also give steps 1-4 near the straight run's)
    assert "resumed from step 2 " in output, output[-6000:]
    rows = train_rows(resumed)
    assert sorted(rows) == [1, 2, 3, 4]  # the metrics read as one run
    assert_same_metrics(train_rows(straight), rows, steps=[3, 4])
    assert_same_metrics(val_rows(straight), val_rows(resumed))
    assert_same_weights(straight, resumed)


def test_two_nodes_on_loopback_train_like_one_process(lab):
    """Two torchrun launchers, `--nnodes 2 --node_rank 0|1 --nproc_per_node 1`, meeting at 127.0.0.1: one
    run over 2 "nodes", which trains like the 1-process run."""
    from distributed_helpers import free_port

    one = lab.run("sft-1", "sft.yaml", 1)
    port, name = free_port(), "sft-2-nodes"
    launchers = [start(lab.folder, "sft.yaml", [f"output.name={name}"], processes=1, port=port, nodes=(2, rank))
                 for rank in (0, 1)]
    outputs = []
    for proc in launchers:
        try:
            outputs.append(proc.communicate(timeout=240)[0])
        except Exception:
            for p in launchers:
                os.killpg(p.pid, signal.SIGKILL)
            raise
    assert [p.returncode for p in launchers] == [0, 0], "\n\n".join(outputs)[-8000:]
    assert "launch plan: 2 processes on 2 nodes (ddp, gloo, cpu)" in outputs[0]
    lab.outputs[name] = outputs[0] + outputs[1]
    assert_same_training(lab, one, lab.folder / "runs" / name)


def _wait_for_step(proc, metrics: Path, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and any(r["step"] >= step for r in train_rows(metrics.parent).values()):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before step {step}:\n{proc.communicate()[0][-6000:]}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no step {step} in {metrics} after {timeout}s:\n{proc.communicate()[0][-6000:]}")


def test_sigkill_of_one_rank_stops_the_run_by_name_and_it_resumes_exactly(lab):
    """kill -9 of rank 1 in the middle of a 2-process run: the launcher exits non-zero well within
    train.distributed.timeout_s, naming the failed rank; the newest complete checkpoint loads; --resume on 2
    processes finishes the run with the per-step losses and final weights of a straight run."""
    from gemcut.models.load import load_run

    steps, timeout_s = 100, 30
    settings = [f"train.max_steps={steps}", f"train.distributed.timeout_s={timeout_s}", "train.keep_last_n=2"]
    name = "sft-killed"
    run_dir = lab.folder / "runs" / name
    proc = start(lab.folder, "sft.yaml", [f"output.name={name}", *settings], processes=2)
    _wait_for_step(proc, run_dir / "metrics.jsonl", 3, timeout=180)
    worker = worker_of_rank(proc.pid, 1)
    assert worker is not None, "no worker with RANK=1 among the launcher's children"
    killed_at = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    try:
        output = proc.communicate(timeout=timeout_s + 30)[0]
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    took = time.monotonic() - killed_at
    assert proc.returncode != 0, output[-6000:]
    assert took < timeout_s + 15, f"the launcher took {took:.0f}s to stop"
    # torchrun's summary names the process that failed first (its "Root Cause" entry)...
    assert re.search(r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\)", output, re.DOTALL), output[-6000:]
    # ...and gemcut's (train/distributed.py lost_processes) the survivor, the lost peers and the last good
    # checkpoint: gloo fails rank 0's next collective at once (connection reset); torchrun's SIGTERM, were it
    # first, only asks gemcut to stop at the step's end, which is a collective too
    said = re.search(r"process 0 of 2: the other processes of the run stopped answering .*"
                     r"last good checkpoint: (\S+?)\. The launcher's log names the process that failed first", output)
    assert said, output[-6000:]
    last = latest_checkpoint(run_dir / "checkpoints")
    assert last is not None and int(last.name.split("-")[1]) < steps, last
    assert Path(said.group(1)) == last
    loaded = load_run(run_dir, last.name)
    assert hasattr(loaded.model, "disable_adapter")  # the LoRA checkpoint loads as a run

    rc, resumed_output = launch(lab.folder, "sft.yaml", [f"output.name={name}", *settings], processes=2, resume=True)
    assert rc == 0, resumed_output[-6000:]
    assert f"resumed from step {last.name.split('-')[1]} " in resumed_output, resumed_output[-6000:]
    # the straight run on 2 processes too: over 100 steps at lr 1e-2, the last-bit differences between 1 and 2
    # processes (the sums' order) grow past 1e-5 (LoRA's B starts at zero, so Adam first sees near-zero
    # gradients); the same processes repeat the same sums, so the resumed run must match this one exactly
    straight = lab.run("sft-long-2", "sft.yaml", 2, *settings)
    rows = train_rows(run_dir)
    assert sorted(rows) == list(range(1, steps + 1))
    assert_same_metrics(train_rows(straight), rows)
    assert_same_weights(straight, run_dir)
    assert_one_writer(run_dir, resumed_output)


@pytest.mark.parametrize(("config", "overrides", "says"), [
    ("sft.yaml", ["train.distributed.strategy=deepspeed"], "train.distributed.strategy=deepspeed is not supported yet; use fsdp2"),
    ("grpo.yaml", ["train.distributed.strategy=fsdp2"], "use train.distributed.strategy=ddp"),
], ids=["deepspeed", "fsdp2-grpo"])
def test_a_strategy_that_cannot_run_is_refused_with_the_fix(lab, config, overrides, says):
    """DeepSpeed (no engine path yet) and FSDP2 under GRPO (sampling runs a different number of forwards
    on each process) stop before the first step with the strategy to use, rather than running another one
    silently or hanging."""
    if config == "grpo.yaml":
        lab.run("classify-1", "classify.yaml", 1)  # the reward model
    rc, output = launch(lab.folder, config, [f"output.name=refused-{overrides[0].rsplit('=', 1)[1]}", *overrides],
                        processes=2, timeout=180)
    assert rc != 0 and says in output, output[-6000:]
    assert not re.search(r"^step 1 ", output, re.MULTILINE)


def test_fsdp2_full_fine_tuning_on_two_processes_trains_like_one(lab):
    """train.distributed.strategy=fsdp2 (torch's fully_shard through accelerate) with every weight
    trained: the sharded run's losses and its consolidated final/ are the 1-process run's."""
    full = ["adapter.method=full"]
    one = lab.run("sft-full-1", "sft.yaml", 1, *full)
    many = lab.run("sft-full-fsdp2", "sft.yaml", 2, *full, "train.distributed.strategy=fsdp2")
    assert "launch plan: 2 processes on 1 node (fsdp2, gloo, cpu)" in lab.outputs[many.name]
    assert_same_training(lab, one, many)
