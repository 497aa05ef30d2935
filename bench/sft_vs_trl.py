"""Supervised fine-tuning speed and memory: gemcut side by side with TRL's SFTTrainer + peft.

    .venv/bin/python bench/sft_vs_trl.py --steps 12                       # the short set: every side, ratios
    .venv/bin/python bench/sft_vs_trl.py --data long --steps 4            # the long set, packed
    .venv/bin/python bench/sft_vs_trl.py --side gemcut --plan selective --packing --steps 5  # one side, JSON

Same model (smollm2-135m-instruct), LoRA r=16 alpha=32 on all linear layers, lr 2e-4 constant,
loss on every token (TRL's default; gemcut is run with data.train_on=all so both optimise the same
objective), on one of two data sets (DATA_SETS):
- short: the chatterbot English conversations at max length 256 (a few dozen tokens each), batch 8, with
  and without packing;
- long: the chitchat conversations (4,004 multi-turn chats, a median of about 350 tokens, many over a
  thousand) at max length 1024, batch 4, packed: the longer, packed chats where activation memory
  decides. (TRL packs a batch padding-free into one row of batch x max length tokens, whose attention
  costs grow with its square: at batch 8 one TRL step took 14 minutes on a busy 2-core machine.)
gemcut runs each activation plan (train.activation_checkpointing: none, selective, full; see
gemcut/models/fast/recompute.py). Each side runs in its own child process, one after the other, so each
peak RSS is its own. "Trained tokens" are the non-padding tokens of the batches, counted in steps 2..N
(step 1 carries one-time warm-up); tokens/s = those tokens / their time. On the long set gemcut's none and
selective plans run a second time with glibc's malloc returning freed blocks of 1 MiB or more to the
kernel (MMAP_ALLOCATOR; "mmap" in the side's name). TRL runs with its own CPU
defaults (bf16 autocast, gradient checkpointing). The ratios are against TRL with the same packing. Each
row also says how busy the machine was while that side ran: the cores other processes kept busy on
average (/proc/stat's busy time less the child's own CPU time, over the side's wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANK, ALPHA, LR = 16, 32, 2e-4
# name: (packaged data set, max length, batch, the packing settings its comparison runs)
DATA_SETS = {"short": ("chatterbot", 256, 8, (False, True)), "long": ("chitchat", 1024, 4, (True,))}
PLANS = ("none", "selective", "full")  # train.activation_checkpointing: false, selective, true
# glibc's malloc returning every block of 1 MiB or more to the kernel when it is freed (gemcut's default,
# gemcut/train/allocator.py, keeps them all in the heap, whose free holes stay resident): the "mmap" sides.
MMAP_ALLOCATOR = {"GEMCUT_KEEP_FREED_MEMORY": "0", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def side_name(side: str, packing: bool, plan: str | None = None) -> str:
    options = [o for o, on in (("packing", packing), (f"{plan} recompute", plan not in (None, "none"))) if on]
    return f"{side} ({', '.join(options)})" if options else side


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB -> GB (Linux)


def busy_cpu_seconds() -> float:
    """CPU seconds this machine has spent busy since boot, all processes (the first line of /proc/stat)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")  # user nice system, irq softirq steal


def conversations(data: str) -> list[dict]:
    """The training records both sides see: gemcut's reader over a packaged chat data set."""
    from gemcut.config import DataConfig
    from gemcut.data.prepare import prepare

    cfg = DataConfig(train=[data], kind="messages", on_error="skip", split={"validation": 0.0, "test": 0.0})
    records = prepare(cfg).splits["train"]
    return [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]} for r in records]


def run_trl(model_dir: str, steps: int, packing: bool, seed: int, data_set: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(seed)
    data, max_length, batch, _ = DATA_SETS[data_set]
    records = conversations(data)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), use_cpu=True, max_steps=steps, per_device_train_batch_size=batch,
        max_length=max_length, packing=packing, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=1, save_strategy="no", report_to=[], seed=seed, dataloader_num_workers=0,
    )
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer, peft_config=lora)

    tokens_per_batch: list[int] = []
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        tokens_per_batch.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator
    step_end: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            step_end.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer.add_callback(Clock())
    trainer.train()
    timed_tokens = sum(tokens_per_batch[1:steps])
    seconds = step_end[-1] - step_end[0]
    return {
        "side": side_name("trl", packing), "data": data_set, "packing": packing, "plan": "full (TRL's default)",
        "steps": steps, "tokens": sum(tokens_per_batch[:steps]),
        "tokens_per_s": timed_tokens / seconds, "peak_rss_gb": peak_rss_gb(), "losses": losses,
        "final_loss": sum(losses[-3:]) / len(losses[-3:]),
    }


def run_gemcut(model_dir: str, steps: int, packing: bool, seed: int, data_set: str, plan: str = "none") -> dict:
    from gemcut.config import load_config
    from gemcut.train.run import train

    out = tempfile.mkdtemp(prefix="gemcut-bench-")
    data, max_length, batch, _ = DATA_SETS[data_set]
    setting = {"none": "false", "selective": "selective", "full": "true"}[plan]
    cfg = load_config(None, [
        f"model.name={model_dir}", f"data.train=[{data}]", "data.kind=messages", "data.on_error=skip", "data.split.validation=0",
        "data.split.test=0", f"data.max_length={max_length}", "data.train_on=all", f"data.packing={str(packing).lower()}",
        "adapter.method=lora", f"adapter.r={RANK}", f"adapter.alpha={ALPHA}", "adapter.target_modules=all-linear",
        f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.lr={LR}", "train.schedule=constant",
        "train.warmup_steps=0", f"train.seed={seed}", "train.sample_prompts=0", f"output.dir={out}", "output.name=bench",
        "eval.forgetting_data=null", f"train.activation_checkpointing={setting}",
    ])
    run_dir = train(cfg)
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "step" in r and r.get("split", "train") == "train"]
    timed = rows[1:steps]
    seconds = timed[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    losses = [r["loss"] for r in rows]
    ran = json.loads((Path(run_dir) / "manifest.json").read_text())["activation_checkpointing"]
    return {
        "side": side_name("gemcut", packing, ran), "data": data_set, "packing": packing, "plan": ran, "steps": steps, "tokens": sum(r["tokens"] for r in rows),
        "tokens_per_s": sum(r["tokens"] for r in timed) / seconds, "peak_rss_gb": peak_rss_gb(), "losses": losses,
        "final_loss": sum(losses[-3:]) / len(losses[-3:]),
    }


def child(side: str, model_dir: str, steps: int, packing: bool, seed: int, data_set: str, plan: str = "none",
          env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--model", model_dir, "--steps", str(steps), "--seed", str(seed),
           "--data", data_set, "--plan", plan]
    if packing:
        cmd.append("--packing")
    busy0, own0, t0 = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    busy1, own1, t1 = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode})")
    own = own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if env:
        result["side"] = result["side"][:-1] + ", mmap)" if result["side"].endswith(")") else result["side"] + " (mmap)"
    return {**result, "other_busy_cores": max(0.0, (busy1 - busy0 - own) / (t1 - t0)), "wall_s": t1 - t0}


def sides(data_set: str) -> list[tuple[str, bool, str, dict | None]]:
    """(side, packing, plan, environment) of one data set's comparison: TRL, then gemcut under each plan, per
    packing setting; on the long set, gemcut's none and selective plans again with MMAP_ALLOCATOR."""
    packings = DATA_SETS[data_set][3]
    out = [("trl", p, "none", None) for p in packings] + [("gemcut", p, plan, None) for plan in PLANS for p in packings]
    if data_set == "long":
        out += [("gemcut", p, plan, MMAP_ALLOCATOR) for plan in ("none", "selective") for p in packings]
    return out


def report(data_set: str, results: list[dict]) -> None:
    data, max_length, batch, _ = DATA_SETS[data_set]
    trl = {r["packing"]: r for r in results if r["side"].startswith("trl")}
    print(f"\n{data_set} set: {data}, max length {max_length}, batch {batch} ({os.cpu_count()} cores; other load: the "
          "cores other processes kept busy while the side ran)")
    print(f"{'side':<46}{'tokens/s':>10}{'peak RSS GB':>13}{'final loss':>12}{'speed vs TRL':>14}{'memory vs TRL':>15}"
          f"{'other load':>12}")
    for r in results:
        base = trl[r["packing"]]
        print(f"{r['side']:<46}{r['tokens_per_s']:>10.1f}{r['peak_rss_gb']:>13.2f}{r['final_loss']:>12.3f}"
              f"{r['tokens_per_s'] / base['tokens_per_s']:>13.2f}x{r['peak_rss_gb'] / base['peak_rss_gb']:>14.2f}x"
              f"{r['other_busy_cores']:>12.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=["trl", "gemcut"], help="run one side only and print its JSON")
    ap.add_argument("--model", default=None, help="model folder; default: the smollm2-135m-instruct alias")
    ap.add_argument("--data", choices=[*DATA_SETS, "both"], default="short", help="data set (DATA_SETS); both: short, then long")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packing", action="store_true", help="one side: pack the examples")
    ap.add_argument("--plan", choices=PLANS, default="none", help="gemcut side: train.activation_checkpointing's plan")
    args = ap.parse_args()
    if args.model is None:
        from gemcut.models.resolve import resolve_model

        args.model = str(resolve_model("smollm2-135m-instruct"))
    if args.side:
        data_set = "short" if args.data == "both" else args.data
        if args.side == "trl":
            result = run_trl(args.model, args.steps, args.packing, args.seed, data_set)
        else:
            result = run_gemcut(args.model, args.steps, args.packing, args.seed, data_set, args.plan)
        print(json.dumps(result))
        return

    everything = []
    for data_set in (list(DATA_SETS) if args.data == "both" else [args.data]):
        results = [child(side, args.model, args.steps, packing, args.seed, data_set, plan, env)
                   for side, packing, plan, env in sides(data_set)]
        report(data_set, results)
        everything += results
    print(json.dumps(everything))


if __name__ == "__main__":
    main()
