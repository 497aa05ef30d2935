"""Real `gemcut train` runs on several CPU processes (torchrun, gloo) for tests/test_distributed.py.

    python -m pytest -q tests/test_distributed.py

`write_inputs(folder)` writes the tiny model folders (tests/tiny.py), the data files and one YAML config
per objective; `launch(...)` runs `python -m gemcut train` (one process) or `python -m torch.distributed.run
... -m gemcut train` (several) in that folder and returns (returncode, output); `start(...)` is the same
as a Popen, for tests that kill or pair launchers. The rest reads what a run wrote: its metrics lines, its
final weights, and the worker processes of a launcher.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from tiny import save_tiny_bert, save_tiny_llama  # noqa: E402

WORDS = "the quick brown fox jumps over lazy dog hello world paris capital france weather okay today love hate wait".split()

# What every run shares: fp32 and one thread a process, so that sums differ only by their order.
TRAIN = {"batch_size": 8, "max_steps": 4, "precision": "fp32", "num_threads": 1, "lr": 1e-2, "warmup_steps": 1,
         "save_every": 2, "keep_last_n": 5, "report_to": []}
SPLIT = {"validation": 0.2, "test": 0.0}


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it for a socket bound to port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.sample(WORDS, n))


def write_inputs(folder: Path) -> Path:
    """Model folders, data files and configs sft.yaml, classify.yaml, dpo.yaml, grpo.yaml in `folder`.

    The GRPO config's reward is the run folder runs/classify-1 (the 1-process classify run), so it is
    launched after that run."""
    folder = Path(folder)
    llama, bert = save_tiny_llama(folder / "llama"), save_tiny_bert(folder / "bert", num_labels=2)
    rng = random.Random(0)
    files = {
        "sft.jsonl": [{"prompt": _sentence(rng, 5), "completion": _sentence(rng, 4)} for _ in range(40)],
        # distinct random sentences: the leakage check drops near-duplicates across splits
        "tweets.jsonl": [{"text": _sentence(rng, 7), "label": rng.choice(["positive", "negative"])} for _ in range(40)],
        "prefs.jsonl": [{"prompt": _sentence(rng, 5), "chosen": _sentence(rng, 4), "rejected": _sentence(rng, 4)}
                        for _ in range(40)],
    }
    for name, rows in files.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {"dir": str(folder / "runs")}
    lora = {"method": "lora", "r": 4, "dropout": 0.0}
    configs = {
        "sft": {"data": {"train": [str(folder / "sft.jsonl")], "split": SPLIT, "max_length": 32}, "model": {"name": str(llama)},
                "adapter": lora, "train": TRAIN, "output": out},
        # model.dropout=0: BERT's dropout draws differ with the micro-batch shapes, so 1 and 2 processes would differ
        "classify": {"data": {"train": [str(folder / "tweets.jsonl")], "split": SPLIT, "max_length": 32},
                     "model": {"name": str(bert), "dropout": 0.0}, "adapter": {"method": "full"},
                     "objective": {"kind": "classify"}, "train": TRAIN, "output": out},
        "dpo": {"data": {"train": [str(folder / "prefs.jsonl")], "split": SPLIT, "max_length": 32}, "model": {"name": str(llama)},
                "adapter": lora, "objective": {"kind": "dpo"}, "train": TRAIN, "output": out},
        "grpo": {"data": {"train": [str(folder / "tweets.jsonl")], "split": SPLIT, "max_length": 32}, "model": {"name": str(llama)},
                 "adapter": lora, "objective": {"kind": "grpo", "rl": {
                     "reward_model": str(folder / "runs" / "classify-1"), "reward_label": "positive",
                     "prompt_words": 3, "group_size": 2, "max_new_tokens": 4}},
                 "train": {**TRAIN, "batch_size": 4, "max_steps": 3}, "eval": {"max_examples": 2}, "output": out},
    }
    for name, cfg in configs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder


def command(config: str, overrides: list[str], *, processes: int = 1, port: int | None = None,
            nodes: tuple[int, int] | None = None, resume: bool = False, accelerate: bool = False) -> list[str]:
    """The command line of one launcher. processes=1 without `nodes` is plain `python -m gemcut train`
    (no launcher at all: the run every other is compared with); otherwise torchrun with `processes` per
    node, and `nodes`=(count, this node's rank) for one launcher of a run over several "nodes"; or, with
    `accelerate`, `accelerate launch --multi_gpu` (which is torchrun underneath, on CPUs as on GPUs:
    its --cpu flag would start a single process unless MPI launches the others)."""
    gemcut = ["-m", "gemcut", "train", config, *overrides, *(["--resume"] if resume else [])]
    if processes == 1 and nodes is None:
        return [sys.executable, *gemcut]
    count, rank = nodes or (1, 0)
    if accelerate:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", str(count),
                "--machine_rank", str(rank), "--num_processes", str(processes * count), "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(port or free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", *gemcut]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(count), "--node_rank", str(rank),
            "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()),
            "--monitor_interval", "0.1", *gemcut]


def environment() -> dict[str, str]:
    # One thread a process: the machine's cores are shared by the processes of a run (and by other tests).
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def start(folder: Path, config: str, overrides: list[str], **kw) -> subprocess.Popen:
    """A launcher running in `folder`, its stdout and stderr together in one pipe (see `command`)."""
    return subprocess.Popen(command(config, overrides, **kw), cwd=folder, env=environment(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def launch(folder: Path, config: str, overrides: list[str], timeout: float = 240, **kw) -> tuple[int, str]:
    """Run one launcher to its end: (returncode, stdout and stderr)."""
    proc = start(folder, config, overrides, **kw)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the launcher and its workers: a session of their own (start_new_session)
        output, _ = proc.communicate()
        return -9, output + f"\n[test] killed after {timeout}s"
    return proc.returncode, output


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_rows(run_dir: Path) -> dict[int, dict]:
    """The training metric line of each step (the lines with a `loss` and no `split`)."""
    return {r["step"]: r for r in metric_rows(run_dir) if "split" not in r and "loss" in r}


def val_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metric_rows(run_dir) if r.get("split") == "validation"}


def final_weights(run_dir: Path) -> dict:
    """Every tensor of the safetensors files of final/ (an adapter, or a whole model), by file and name."""
    from safetensors.torch import load_file

    files = sorted((Path(run_dir) / "final").glob("*.safetensors"))
    assert files, f"no safetensors in {run_dir}/final"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # fields after the ")" that ends the command name: state, ppid, ...
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def worker_of_rank(launcher: int, rank: int) -> int | None:
    """The worker process of `launcher` (a torchrun) whose environment says RANK=`rank`."""
    for pid in children(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None
