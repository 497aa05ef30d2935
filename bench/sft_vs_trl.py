"""Supervised fine-tuning speed and memory: gemcut side by side with TRL's SFTTrainer + peft.

    .venv/bin/python bench/sft_vs_trl.py --steps 20            # both sides, prints ratios
    .venv/bin/python bench/sft_vs_trl.py --side trl --steps 5  # one side, JSON on stdout

Same model (smollm2-135m-instruct), LoRA r=16 alpha=32 on all linear layers, max length 256, batch 8,
lr 2e-4 constant, chatterbot English conversations, loss on every token (TRL's default; gemcut is run
with data.train_on=all so both optimise the same objective). Each side runs in its own child process,
one after the other, so each peak RSS is its own. "Trained tokens" are the non-padding tokens of the
batches, counted in steps 2..N (step 1 carries one-time warm-up); tokens/s = those tokens / their time.
TRL runs with its own CPU defaults (bf16 autocast, gradient checkpointing), with and without packing.
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

MAX_LENGTH, BATCH, RANK, ALPHA, LR = 256, 8, 16, 32, 2e-4


def side_name(side: str, packing: bool, checkpointing: bool) -> str:
    options = [o for o, on in (("packing", packing), ("ckpt", checkpointing)) if on]
    return f"{side} ({', '.join(options)})" if options else side


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB -> GB (Linux)


def chatterbot_conversations() -> list[dict]:
    """The training records both sides see: gemcut's reader over the packaged chatterbot corpus."""
    from gemcut.config import DataConfig
    from gemcut.data.prepare import prepare

    cfg = DataConfig(train=["chatterbot"], kind="messages", on_error="skip", split={"validation": 0.0, "test": 0.0})
    records = prepare(cfg).splits["train"]
    return [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]} for r in records]


def run_trl(model_dir: str, steps: int, packing: bool, seed: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(seed)
    records = chatterbot_conversations()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), use_cpu=True, max_steps=steps, per_device_train_batch_size=BATCH,
        max_length=MAX_LENGTH, packing=packing, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
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
        "side": side_name("trl", packing, True),  # TRL's CPU default is gradient checkpointing "steps": steps, "tokens": sum(tokens_per_batch[:steps]),
        "tokens_per_s": timed_tokens / seconds, "peak_rss_gb": peak_rss_gb(), "losses": losses,
        "final_loss": sum(losses[-3:]) / len(losses[-3:]),
    }


def run_gemcut(model_dir: str, steps: int, packing: bool, seed: int, checkpointing: bool = False) -> dict:
    from gemcut.config import load_config
    from gemcut.train.run import train

    out = tempfile.mkdtemp(prefix="gemcut-bench-")
    cfg = load_config(None, [
        f"model.name={model_dir}", "data.train=[chatterbot]", "data.kind=messages", "data.on_error=skip", "data.split.validation=0",
        "data.split.test=0", f"data.max_length={MAX_LENGTH}", "data.train_on=all", f"data.packing={str(packing).lower()}",
        "adapter.method=lora", f"adapter.r={RANK}", f"adapter.alpha={ALPHA}", "adapter.target_modules=all-linear",
        f"train.batch_size={BATCH}", f"train.max_steps={steps}", f"train.lr={LR}", "train.schedule=constant",
        "train.warmup_steps=0", f"train.seed={seed}", "train.sample_prompts=0", f"output.dir={out}", "output.name=bench",
        "eval.forgetting_data=null", f"train.activation_checkpointing={str(checkpointing).lower()}",
    ])
    run_dir = train(cfg)
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "step" in r and r.get("split", "train") == "train"]
    timed = rows[1:steps]
    seconds = timed[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    losses = [r["loss"] for r in rows]
    return {
        "side": side_name("gemcut", packing, checkpointing), "steps": steps, "tokens": sum(r["tokens"] for r in rows),
        "tokens_per_s": sum(r["tokens"] for r in timed) / seconds, "peak_rss_gb": peak_rss_gb(), "losses": losses,
        "final_loss": sum(losses[-3:]) / len(losses[-3:]),
    }


def child(side: str, model_dir: str, steps: int, packing: bool, seed: int, checkpointing: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--model", model_dir, "--steps", str(steps), "--seed", str(seed)]
    if packing:
        cmd.append("--packing")
    if checkpointing:
        cmd.append("--checkpointing")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=["trl", "gemcut"], help="run one side only and print its JSON")
    ap.add_argument("--model", default=None, help="model folder; default: the smollm2-135m-instruct alias")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--checkpointing", action="store_true", help="gemcut side: train.activation_checkpointing=true")
    args = ap.parse_args()
    if args.model is None:
        from gemcut.models.resolve import resolve_model

        args.model = str(resolve_model("smollm2-135m-instruct"))
    if args.side:
        if args.side == "trl":
            result = run_trl(args.model, args.steps, args.packing, args.seed)
        else:
            result = run_gemcut(args.model, args.steps, args.packing, args.seed, args.checkpointing)
        print(json.dumps(result))
        return

    sides = [("trl", False, False), ("trl", True, False), ("gemcut", False, False), ("gemcut", True, False),
             ("gemcut", False, True), ("gemcut", True, True)]
    results = [child(side, args.model, args.steps, packing, args.seed, ckpt) for side, packing, ckpt in sides]
    trl_best = max((r for r in results if r["side"].startswith("trl")), key=lambda r: r["tokens_per_s"])
    print(f"{'side':<20}{'tokens/s':>10}{'peak RSS GB':>13}{'final loss':>12}{'speed vs best TRL':>19}{'memory vs TRL':>15}")
    for r in results:
        print(f"{r['side']:<20}{r['tokens_per_s']:>10.1f}{r['peak_rss_gb']:>13.2f}{r['final_loss']:>12.3f}"
              f"{r['tokens_per_s'] / trl_best['tokens_per_s']:>18.2f}x{r['peak_rss_gb'] / trl_best['peak_rss_gb']:>14.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
