"""GPU training speed, MFU and memory: gemcut against TRL's SFTTrainer + peft, same GPU, same invocation.

    .venv/bin/python bench/gpu.py                         # LoRA and full fine-tuning, both sides, the table
    .venv/bin/python bench/gpu.py --steps 30 --batch 8    # longer timing window
    .venv/bin/python bench/gpu.py --side gemcut --method lora --model DIR --data FILE   # one run, JSON on stdout

Without a CUDA GPU it prints one line and exits 0.

Model: a Llama of about 1.07B parameters at random initialisation (hidden 2048, 16 layers, 32 attention
heads, 8 KV heads, MLP 8192: Llama 3.2 1B's shape), tied embeddings, the vocabulary of the packaged
smollm2-135m-instruct tokenizer (49,152 tokens), saved once in bf16; both sides load that folder in bf16.
Data: synthetic two-turn chats of random tokenizer words (user 16-128 words, assistant 64-1600), loss on
every token (TRL's default; gemcut runs with data.train_on=all), packed best-fit into rows of 2048 tokens
(gemcut data.packing, TRL packing="bfd"), `--batch` rows a step, LoRA r=16 alpha=32 on all linear layers,
constant learning rate. Attention is what `model.attn_implementation: auto` picks (flash_attention_2 where
flash_attn is installed, else sdpa), on both sides.

Accounting (stated, not measured):
- tokens/s: the tokens of steps 3..N over their time (steps 1-2 carry one-time warm-up), each side's clock
  read after a device sync.
- MFU = tokens/s x FLOPs per token / the GPU's peak dense bf16 FLOP/s (PEAK_BF16, by device name, or
  --peak-tflops). FLOPs per token: 6N for full fine-tuning (forward 2N, backward 4N: input and weight
  gradients), 4N for LoRA (the frozen base gets input gradients but no weight gradients; the adapters'
  own FLOPs, under 1% at r=16, are left out). N = all parameters (the tied embedding counts once, as the
  output projection). Attention's T^2 FLOPs and recomputation are not counted, so MFU is a lower bound
  for a run that recomputes (TRL's default gradient checkpointing does).
- peak memory: torch.cuda.max_memory_allocated of each side's own process.
Each side runs in its own child process, one after the other (as bench/sft_vs_trl.py), with TRL's own
defaults otherwise (gradient checkpointing on). Targets (issue #20): MFU >= 40% for full fine-tuning;
LoRA >= 1.5x TRL's tokens/s at <= 0.7x its peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ, RANK, ALPHA = 2048, 16, 32
LR = {"lora": 2e-4, "full": 2e-5}
SHAPE = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
         "intermediate_size": 8192, "max_position_embeddings": SEQ, "rope_theta": 500000.0, "tie_word_embeddings": True}
FLOPS_PER_PARAM = {"full": 6, "lora": 4}
# Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name (first match wins).
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12)]
NO_GPU = ("bench/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); "
          "run it on a CUDA machine: .venv/bin/python bench/gpu.py")


def peak_flops(device_name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16 if key in device_name), None)


def attention() -> str:
    """The kernel gemcut's `model.attn_implementation: auto` picks for a bf16 decoder here; TRL gets the same."""
    import torch

    from gemcut.models.load import resolve_attn_implementation
    from gemcut.tasks import task_named

    return resolve_attn_implementation("auto", torch.bfloat16, task=task_named("causal_lm"))


def build_model(folder: Path, seed: int) -> int:
    """Save the random ~1B Llama (bf16) and the smollm2 tokenizer into `folder`; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gemcut.models.load import load_tokenizer
    from gemcut.models.resolve import resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def write_chats(folder: Path, path: Path, n: int, seed: int) -> None:
    """`n` synthetic two-turn chats as JSONL, made of whole words of the model's tokenizer (about one token each)."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(folder).get_vocab()
    words = sorted(t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower())
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            user, assistant = (" ".join(rng.choices(words, k=rng.randint(lo, hi))) for lo, hi in ((16, 128), (64, 1600)))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": assistant}]}) + "\n")


def run_trl(model_dir: str, data: str, method: str, steps: int, batch: int, seed: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(seed)
    records = [json.loads(line) for line in Path(data).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=attention())
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-gpu-bench-"), max_steps=steps, per_device_train_batch_size=batch,
        max_length=SEQ, packing=True, bf16=True, learning_rate=LR[method], lr_scheduler_type="constant",
        warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[], seed=seed, dataloader_num_workers=0,
    )
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
                         peft_config=lora if method == "lora" else None)
    tokens_per_batch: list[int] = []
    collate = trainer.data_collator

    def counting_collator(features):
        batch_ = collate(features)
        mask = batch_.get("attention_mask")  # padding-free batches (TRL's bfd packing) have none: no padding
        tokens_per_batch.append(int(mask.sum()) if mask is not None else int(batch_["input_ids"].numel()))
        return batch_

    trainer.data_collator = counting_collator
    step_end: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            step_end.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer.add_callback(Clock())
    trainer.train()
    # step_end[i] closes step i+1: steps 3..N run from step_end[1] to step_end[-1].
    return {"side": "trl (ckpt)", "method": method, "steps": steps, "tokens_per_s": sum(tokens_per_batch[2:steps]) / (step_end[-1] - step_end[1]),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1024**3, "final_loss": losses[-1] if losses else None}


def run_gemcut(model_dir: str, data: str, method: str, steps: int, batch: int, seed: int) -> dict:
    import torch

    from gemcut.config import load_config
    from gemcut.train.run import train

    overrides = [
        f"model.name={model_dir}", "model.dtype=bfloat16", "model.attn_implementation=auto",
        f"data.train=[{data}]", "data.kind=messages", "data.split.validation=0", "data.split.test=0",
        f"data.max_length={SEQ}", "data.train_on=all", "data.packing=true",
        f"adapter.method={method}", f"adapter.r={RANK}", f"adapter.alpha={ALPHA}", "adapter.target_modules=all-linear",
        f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.lr={LR[method]}", "train.schedule=constant",
        "train.warmup_steps=0", "train.precision=bf16", "train.log_every=1", f"train.seed={seed}", "train.sample_prompts=0",
        f"output.dir={tempfile.mkdtemp(prefix='gemcut-gpu-bench-')}", "output.name=bench", "eval.forgetting_data=null",
    ]
    if attention() == "flash_attention_2":
        # transformers' flash attention isolates packed documents (varlen, from position_ids) only in a batch
        # of one row; with more rows per forward, packed documents would see each other (docs/models.md).
        overrides.append("train.micro_batch_size=1")
    run_dir = train(load_config(None, overrides))
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "tokens_per_s" in r and r.get("split", "train") == "train"]
    timed = [r for r in rows if r["step"] >= 3]  # log_every=1: one row a step, its clock read after a sync
    return {"side": "gemcut", "method": method, "steps": steps,
            "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["tokens"] / r["tokens_per_s"] for r in timed),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1024**3, "final_loss": rows[-1]["loss"]}


def child(side: str, method: str, model_dir: Path, data: Path, steps: int, batch: int, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--method", method, "--model", str(model_dir), "--data", str(data),
           "--steps", str(steps), "--batch", str(batch), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{side} {method} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: list[dict], n_params: int, peak: float | None, device: str, attn: str) -> list[str]:
    """The table and the three targets' verdicts, as lines."""
    lines = [f"{device}; model {n_params / 1e9:.2f}B parameters; attention {attn}; peak bf16 "
             + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (pass --peak-tflops): no MFU"),
             f"{'side':<12}{'method':<8}{'tokens/s':>11}{'MFU':>8}{'peak GB':>10}{'final loss':>12}"]
    for r in results:
        r["mfu"] = r["tokens_per_s"] * FLOPS_PER_PARAM[r["method"]] * n_params / peak if peak else None
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        loss = r["final_loss"] if r["final_loss"] is not None else float("nan")
        lines.append(f"{r['side']:<12}{r['method']:<8}{r['tokens_per_s']:>11.0f}{mfu:>8}{r['peak_memory_gb']:>10.2f}{loss:>12.3f}")
    by = {(r["side"].split()[0], r["method"]): r for r in results}
    full, lora, trl_lora = by.get(("gemcut", "full")), by.get(("gemcut", "lora")), by.get(("trl", "lora"))
    if full and full["mfu"] is not None:
        lines.append(f"target full fine-tuning MFU >= 40%: {100 * full['mfu']:.1f}% ({'met' if full['mfu'] >= 0.40 else 'NOT met'})")
    if lora and trl_lora:
        speed, memory = lora["tokens_per_s"] / trl_lora["tokens_per_s"], lora["peak_memory_gb"] / trl_lora["peak_memory_gb"]
        lines.append(f"target LoRA >= 1.5x TRL tokens/s: {speed:.2f}x ({'met' if speed >= 1.5 else 'NOT met'}); "
                     f"<= 0.7x TRL peak memory: {memory:.2f}x ({'met' if memory <= 0.7 else 'NOT met'})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=["trl", "gemcut"], help="run one side only and print its JSON (needs --model, --data)")
    ap.add_argument("--method", choices=["lora", "full"], default="lora", help="with --side: what trains")
    ap.add_argument("--model", help="with --side: the model folder the parent built")
    ap.add_argument("--data", help="with --side: the chats JSONL the parent wrote")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="packed rows of 2048 tokens per optimizer step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when PEAK_BF16 does not know it")
    ap.add_argument("--keep", help="build the model and data in this folder and keep them (default: a temporary one)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(NO_GPU)
        return
    if args.side:
        run = run_trl if args.side == "trl" else run_gemcut
        print(json.dumps(run(args.model, args.data, args.method, args.steps, args.batch, args.seed)))
        return

    device = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    work = Path(args.keep or tempfile.mkdtemp(prefix="gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data = work / "llama-1b-random", work / "chats.jsonl"
    n_params = build_model(model_dir, args.seed)
    write_chats(model_dir, data, n=args.steps * args.batch * 3, seed=args.seed)  # about 2 chats a row: no epoch wraps
    results = [child(side, method, model_dir, data, args.steps, args.batch, args.seed)
               for method in ("lora", "full") for side in ("trl", "gemcut")]
    print("\n".join(report(results, n_params, peak, device, attention())))
    print(json.dumps({"device": device, "params": n_params, "peak_flops": peak, "results": results}))


if __name__ == "__main__":
    main()
