"""Bounded load test of `gemcut serve` on loopback, beside plain transformers `generate` on the same model.

    python bench/serve_load.py --model smollm2-135m-instruct --requests 200 --concurrency 16 --max-tokens 16

Starts the real server (create_app + uvicorn) in this process on 127.0.0.1 at a free port, sends
`--requests` chat completions, `--concurrency` at a time, with the official `openai` client (greedy, so
every run does the same work), and reports errors, p50/p95 latency, throughput, and the server's own time
to first token and inter-token latency (p50/p95 from its /metrics histograms, interpolated within a bucket
as Prometheus' histogram_quantile does). Then the same prompts go one by one through
`AutoModelForCausalLM.generate` (what a script without a server does) for the baseline. Prompts are
questions from the packaged chatterbot corpus. Prints a Markdown table and JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import secrets
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def prompts(n: int) -> list[str]:
    from gemcut.export.report import heldout_texts

    base = [t.split("?")[0] + "?" if "?" in t else t for t in heldout_texts(64)]
    return [base[i % len(base)] for i in range(n)]


def stats(latencies: list[float], wall: float, tokens: int, n: int) -> dict:
    arr = np.asarray(latencies) * 1000
    return {"requests": n, "p50_ms": round(float(np.percentile(arr, 50)), 1), "p95_ms": round(float(np.percentile(arr, 95)), 1),
            "requests_per_s": round(n / wall, 2), "completion_tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 1)}


def histogram_quantile(q: float, histogram) -> float | None:
    """The q-quantile of a prometheus-client Histogram (all label sets together), linear within its bucket."""
    counts: dict[float, float] = {}
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                counts[bound] = counts.get(bound, 0.0) + sample.value
    bounds = sorted(counts)
    total = counts[bounds[-1]] if bounds else 0.0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if counts[bound] >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(counts[bound] - below, 1e-12)
        lower, below = bound, counts[bound]
    return lower


def latency_figures(metrics) -> dict:
    """Server-side time to first token and inter-token latency, p50 and p95 in ms."""
    out = {}
    for key, histogram in (("ttft", metrics.time_to_first_token), ("itl", metrics.inter_token_latency)):
        for q in (0.5, 0.95):
            value = histogram_quantile(q, histogram)
            out[f"{key}_p{int(q * 100)}_ms"] = None if value is None else round(value * 1000, 1)
    return out


def run_server(args) -> dict:
    import openai
    from serve_runs import running

    from gemcut.serve.app import create_app
    from gemcut.serve.settings import ServeSettings

    key = secrets.token_urlsafe(16)
    settings = ServeSettings(models=[args.model], api_keys=[key], db_url=f"sqlite:///{args.db}", max_batch=args.max_batch,
                             max_queue=max(64, args.concurrency * 2), num_threads=args.threads, batch_wait_ms=args.batch_wait_ms)
    app = create_app(settings)
    name = next(iter(app.state.registry.models))
    texts = prompts(args.requests)
    errors: list[str] = []
    latencies: list[float] = []
    tokens = 0
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)

        def one(text: str):
            t0 = time.perf_counter()
            r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": text}],
                                               max_tokens=args.max_tokens, temperature=0)
            return time.perf_counter() - t0, r.usage.completion_tokens

        one(texts[0])  # warm-up
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            for fut in concurrent.futures.as_completed([pool.submit(one, t) for t in texts]):
                try:
                    dt, n = fut.result()
                    latencies.append(dt)
                    tokens += n
                except Exception as e:  # counted and shown, never dropped
                    errors.append(f"{type(e).__name__}: {e}")
        wall = time.perf_counter() - t0
        # Sequences per decode step (per generate call before continuous batching).
        metrics = app.state.metrics.batch_size.collect()[0].samples
        mean_batch = next(s.value for s in metrics if s.name.endswith("_sum")) / max(1, next(s.value for s in metrics if s.name.endswith("_count")))
        timing = latency_figures(app.state.metrics) if hasattr(app.state.metrics, "time_to_first_token") else {}
    out = stats(latencies, wall, tokens, len(texts))
    out |= {"errors": len(errors), "error_samples": errors[:3], "concurrency": args.concurrency, "mean_batch": round(mean_batch, 2)}
    out |= timing
    return out


def run_plain(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemcut.models.resolve import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = prompts(args.baseline_requests)
    latencies, tokens = [], 0

    def one(text: str) -> int:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        return out.shape[1] - ids["input_ids"].shape[1]

    one(texts[0])
    t0 = time.perf_counter()
    for text in texts:
        s = time.perf_counter()
        tokens += one(text)
        latencies.append(time.perf_counter() - s)
    return stats(latencies, time.perf_counter() - t0, tokens, len(texts)) | {"concurrency": 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--baseline-requests", type=int, default=40, help="Prompts sent one by one through plain generate.")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-baseline", action="store_true", help="Only the server (the baseline takes a minute or more).")
    p.add_argument("--db", default="/tmp/gemcut_bench_serve.db")
    p.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    server = run_server(args)
    plain = run_plain(args) if not args.skip_baseline else {"requests": 0, "p50_ms": None, "p95_ms": None, "requests_per_s": None,
                                                              "completion_tokens_per_s": None}
    result = {"model": args.model, "max_tokens": args.max_tokens, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg()[0], "gemcut_serve": server, "plain_generate": plain}
    print("| setup | requests | concurrency | errors | p50 ms | p95 ms | req/s | completion tok/s | TTFT p50/p95 ms | ITL p50/p95 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| gemcut serve (max_batch {args.max_batch}, mean {server['mean_batch']} per step) | {server['requests']} | "
          f"{server['concurrency']} | {server['errors']} | {server['p50_ms']} | {server['p95_ms']} | {server['requests_per_s']} | "
          f"{server['completion_tokens_per_s']} | {server.get('ttft_p50_ms')}/{server.get('ttft_p95_ms')} | "
          f"{server.get('itl_p50_ms')}/{server.get('itl_p95_ms')} |")
    print(f"| plain transformers generate, one at a time | {plain['requests']} | 1 | 0 | {plain['p50_ms']} | {plain['p95_ms']} | "
          f"{plain['requests_per_s']} | {plain['completion_tokens_per_s']} | | |")
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if server["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
