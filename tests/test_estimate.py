"""`gemcut estimate` (gemcut/train/estimate.py): memory parts add up, the probe measures activations and time,
and the time model follows what `fit` will do (its batches, evaluations, steps) at about its speed."""

import json
import math
import statistics

import pytest
import torch
from tiny import save_tiny_llama, tiny_tokenizer
from train_helpers import causal_examples, collate_causal, config, fit_examples, llama

from gemcut.config import RunConfig
from gemcut.train import estimate as estimate_module
from gemcut.train.estimate import ADAM_BYTES, estimate, evaluations, plan_steps, total_steps


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("m") / "tiny-llama")


def _cfg(name, **over):
    raw = {"model": {"name": str(name)}, "adapter": {"method": "lora", "r": 4},
           "train": {"batch_size": 2, "max_steps": 10, "precision": "fp32"}, "data": {"max_length": 32}}
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    return RunConfig.model_validate(raw)


def _qa(path, n, words=13):
    """Prompt/completion records of varied length (a prompt of 0..words-1 repeated phrases)."""
    path.write_text("".join(json.dumps({"prompt": f"question {i}? " + "the quick brown fox " * (i % words),
                                        "completion": f"answer {i} " + "is paris " * (i % 5)}) + "\n" for i in range(n)))
    return path


def test_estimate_parts_and_probe(llama_dir, monkeypatch):
    monkeypatch.setattr(estimate_module, "PROBE_SECONDS", 1e9)  # every timed pass runs, however slow the machine
    est = estimate(_cfg(llama_dir))
    assert est.trainable_params < est.total_params
    assert est.weights_bytes == est.total_params * 4  # float32, tied embedding counted once
    assert est.gradients_bytes == est.trainable_params * 4
    assert est.optimizer_bytes == est.trainable_params * ADAM_BYTES
    assert est.activations_source == "measured" and est.activations_bytes > 0
    assert est.batch_shape == (2, 32) and est.steps == 10
    # No data: nothing to prepare, tokenize or validate; the run's time is its steps.
    assert set(est.time_parts) == {"steps"} and est.total_seconds == pytest.approx(10 * est.seconds_per_step)
    assert est.probe_passes == {"warm-up": 1, "train": 3}
    assert est.fits and "fits" in str(est) and est.summary.startswith("LoRA r=4")
    # Longer sequences save more activations; the measurement sees it.
    longer = estimate(_cfg(llama_dir, data={"max_length": 96}))
    assert longer.activations_bytes > 2 * est.activations_bytes
    # Without the probe: an approximation, no time.
    quick = estimate(_cfg(llama_dir), probe=False)
    assert quick.activations_source == "approximate" and quick.activations_bytes > 0 and quick.seconds_per_step is None


def test_freeze_and_full_differ_in_trainable_memory(llama_dir):
    full = estimate(_cfg(llama_dir, adapter={"method": "full"}), probe=False)
    frozen = estimate(_cfg(llama_dir, adapter={"method": "freeze", "train_last_n_layers": 1}), probe=False)
    assert full.trainable_params == full.total_params
    assert frozen.optimizer_bytes < full.optimizer_bytes and frozen.activations_bytes < full.activations_bytes


def test_steps_from_the_data(llama_dir, tmp_path):
    cfg = _cfg(llama_dir, data={"train": [str(_qa(tmp_path / "qa.jsonl", 41))], "max_length": 256},
               train={"max_steps": None, "epochs": 2})
    est = estimate(cfg, probe=False)  # the step count comes from the data, not from the probe
    from gemcut.data.prepare import prepare

    n_train = len(prepare(cfg.data).splits["train"])
    assert 20 < n_train < 41 and est.steps == 2 * math.ceil(n_train / 2) == total_steps(cfg, n_train)


@pytest.mark.parametrize("grouped", [True, False])
def test_the_plan_is_the_batches_fit_takes(tmp_path, grouped):
    """plan_steps lists the examples of every micro-batch `fit` collates, in order, across epochs and with
    accumulation (20 examples, 6 a step: each epoch ends with a short step)."""
    from gemcut.objectives import CausalLM

    examples = causal_examples(20)
    index = {id(ex): i for i, ex in enumerate(examples)}
    seen = []

    def recording(batch):
        seen.append([index[id(ex)] for ex in batch])
        return collate_causal(batch)

    cfg = config(max_steps=8, batch_size=6, micro_batch_size=3, seed=3, group_by_length=grouped)
    fit_examples(llama(), CausalLM(), examples, recording, config=cfg, run_dir=tmp_path)
    plan = plan_steps([len(ex["input_ids"]) for ex in examples], batch_size=6, micro_batch_size=3, steps=8, seed=3, grouped=grouped)
    assert [mb for step in plan for mb in step] == seen
    assert [len(step) for step in plan] == [2, 2, 2, 1, 2, 2, 2, 1]


def test_evaluations_and_steps_count_like_fit():
    assert evaluations(12, 6) == 2 and evaluations(10, 3) == 4 and evaluations(10, None) == 1 and evaluations(3, 5) == 1
    cfg = config(batch_size=8, micro_batch_size=4, epochs=1.5)
    assert total_steps(cfg, 33) == math.ceil(1.5 * 5) and total_steps(config(max_steps=7), None) == 7
    assert total_steps(config(), None) is None


def test_a_sample_stands_for_the_data_and_the_probe_runs_a_fixed_number_of_passes(llama_dir, tmp_path, monkeypatch):
    """The estimate's own time is bounded by design: it tokenizes at most SAMPLE_RECORDS training records
    (scaling the counts to the whole split) and runs the model at most probe_steps + 4 times, whatever the
    data size; timed passes after the first only within PROBE_SECONDS."""
    import gemcut.data.tokenize as tokenize_module

    monkeypatch.setattr(estimate_module, "SAMPLE_RECORDS", 40)
    monkeypatch.setattr(estimate_module, "PROBE_SECONDS", 1e9)
    tokenized = []
    real = tokenize_module.tokenize_records

    def counting(records, *args, **kwargs):
        records = list(records)
        tokenized.append(len(records))
        return real(records, *args, **kwargs)

    monkeypatch.setattr(tokenize_module, "tokenize_records", counting)
    cfg = _cfg(llama_dir, data={"train": [str(_qa(tmp_path / "qa.jsonl", 300))], "max_length": 256,
                                "split": {"validation": 0.1, "test": 0.0}},
               train={"max_steps": None, "epochs": 1, "eval_every": 20, "batch_size": 4})
    est = estimate(cfg, probe_steps=3)
    from gemcut.data.prepare import prepare

    n_train = len(prepare(cfg.data).splits["train"])
    assert n_train > 200 and tokenized[:2] == [40, 10]  # training sample, then a quarter of it for validation
    assert est.steps == math.ceil(n_train / 4)  # every record is one example (none is longer than max_length)
    assert est.probe_passes == {"warm-up": 2, "train": 3, "validation forward": 1, "one-token forward": 1}
    assert set(est.time_parts) == {"prepare", "tokenize", "load", "steps", "validation", "samples"}
    assert est.total_seconds == pytest.approx(sum(est.time_parts.values()))
    assert est.time_parts["steps"] == pytest.approx(est.steps * est.seconds_per_step)
    # With no time budget left after the first timed pass, there is no second one.
    monkeypatch.setattr(estimate_module, "PROBE_SECONDS", 0.0)
    assert estimate(cfg, probe_steps=3).probe_passes["train"] == 1


def test_predicted_step_time_is_near_a_real_runs(tmp_path):
    """The predicted seconds per step of a small model (4 layers, 1.1M parameters, so a step computes more
    than the loop's bookkeeping) is within 2.5x of the step time of the same run trained for real, measured
    right after it on one thread, and the run validates as often as the estimate counted."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gemcut.train.run import train

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                                 tie_word_embeddings=True)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = RunConfig.model_validate({
        "model": {"name": str(tmp_path / "m")}, "adapter": {"method": "lora", "r": 4},
        "train": {"batch_size": 8, "max_steps": 8, "precision": "fp32", "eval_every": 4, "num_threads": 1, "log_every": 2},
        "data": {"train": [str(_qa(tmp_path / "qa.jsonl", 200))], "max_length": 128, "split": {"validation": 0.1, "test": 0.0}},
        "output": {"dir": str(tmp_path / "runs")}})
    threads = torch.get_num_threads()
    try:
        est = estimate(cfg, probe_steps=3)
        rows = [json.loads(line) for line in (train(cfg) / "metrics.jsonl").read_text().splitlines()]
    finally:
        torch.set_num_threads(threads)
    # Each training row covers the 2 steps since the previous one (evaluation and saving not included).
    measured = statistics.median(r["tokens"] / r["tokens_per_s"] / 2 for r in rows if "tokens_per_s" in r)
    assert 1 / 2.5 < est.seconds_per_step / measured < 2.5, (est.seconds_per_step, measured)
    assert sum("val_loss" in r for r in rows) == evaluations(8, 4) == 2


def test_cli_models_and_estimate(llama_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gemcut.cli import app, register_commands

    monkeypatch.setenv("GEMCUT_HOME", str(tmp_path / "home"))
    register_commands()
    out = CliRunner().invoke(app, ["models", "--json"])
    assert out.exit_code == 0, out.output
    assert {"smollm2-135m-instruct", "minilm-l6"} <= {r["name"] for r in json.loads(out.output)}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{name: {llama_dir}}}\ntrain: {{max_steps: 3, batch_size: 2}}\ndata: {{max_length: 16}}\n")
    out = CliRunner().invoke(app, ["estimate", str(cfg), "adapter.r=2", "--no-probe"])
    assert out.exit_code == 0, out.output
    assert "LoRA r=2" in out.output and "optimizer" in out.output and "fits" in out.output
    out = CliRunner().invoke(app, ["estimate", str(cfg), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)  # stderr has the model loading's progress bar
    assert data["time_parts"] == {"steps": pytest.approx(3 * data["seconds_per_step"])} and data["estimate_seconds"] > 0


def _sharded(processes, *, method="full", available=None, **distributed):
    """The estimate, without a probe, of a tiny 8-block Llama (blocks outweigh the embedding, as in real models)
    on `processes` processes: global batch 8, so one process's micro-batch is 8 / processes rows."""
    from tiny import tiny_llama

    from gemcut.models.adapters import apply_adapter
    from gemcut.train.estimate import estimate_model

    cfg = RunConfig.model_validate({
        "model": {"name": "tiny"}, "adapter": {"method": method, "r": 4},
        "train": {"batch_size": 8, "max_steps": 3, "precision": "fp32", "distributed": distributed},
        "data": {"max_length": 32}})
    model = apply_adapter(tiny_llama(layers=8), cfg.adapter, "causal_lm")
    return estimate_model(cfg, model, "causal_lm", runtime_bytes=0, available_bytes=available or 10 * 1024**3,
                          processes=processes)


def _rows(est):
    return {row.name: row for row in est.strategies}


def _units(model_est):
    """(R, K) of the tiny Llama counted by hand: embedding (tied head) + final norm; one block."""
    from tiny import tiny_llama

    m = tiny_llama(layers=8)
    block = sum(p.numel() for p in m.model.layers[0].parameters()) * 4
    root = (m.model.embed_tokens.weight.numel() + m.model.norm.weight.numel()) * 4
    return root, block


def test_per_device_memory_follows_each_strategys_formula():
    """On 4 processes: DDP holds everything plus its gradient buckets; ZeRO-2 shards gradients and optimizer
    state; ZeRO-3 and FSDP2 also the weights, plus the parameters they gather; activations are those of one
    process's micro-batch (8 / 4 rows instead of 8)."""
    one, est = _sharded(1), _sharded(4)
    W, G, Opt = est.weights_bytes, est.gradients_bytes, est.optimizer_bytes
    root, block = _units(est)
    assert (W, G, Opt) == (one.weights_bytes, one.gradients_bytes, one.optimizer_bytes) and W == G
    assert W == root + 8 * block  # every parameter is in the root or in a block
    A = int(one.activations_bytes * 2 / 8)
    assert est.process_micro_batch == 2 and all(row.activations == A for row in est.strategies)
    rows = _rows(est)
    assert list(rows) == ["ddp", "fsdp2 full", "fsdp2 grad_op", "zero-1", "zero-2", "zero-3"]
    q = lambda b: -(-b // 4)  # noqa: E731
    expect = {  # weights, gradients, optimizer, gathered, buffers
        "ddp": (W, G, Opt, 0, G),
        "fsdp2 full": (q(W), q(G), q(Opt), root + 2 * block, 0),
        "fsdp2 grad_op": (q(W), q(G), q(Opt), W, 0),
        "zero-1": (W, G, q(Opt), 0, 0),
        "zero-2": (W, q(G), q(Opt), 0, 0),
        "zero-3": (q(W), q(G), q(Opt), 2 * max(root, block), 0),
    }
    for name, (w, g, o, gathered, buffers) in expect.items():
        row = rows[name]
        assert (row.weights, row.gradients, row.optimizer, row.gathered, row.buffers, row.offloaded) == \
            (w, g, o, gathered, buffers, 0), name
        assert row.device_bytes == w + g + o + A + gathered + buffers
    per = {name: row.device_bytes for name, row in rows.items()}
    assert per["zero-3"] < per["zero-2"] < per["zero-1"] < per["ddp"]
    assert per["fsdp2 full"] == pytest.approx(per["zero-3"], rel=0.15)
    assert rows["ddp"].configured and sum(row.configured for row in est.strategies) == 1  # strategy auto is ddp


def test_frozen_weights_are_sharded_but_have_no_gradients_or_optimizer_state():
    est = _sharded(4, method="lora")
    lora = _rows(est)
    assert est.gradients_bytes < est.weights_bytes / 4  # LoRA: the base is frozen
    full, zero2 = lora["fsdp2 full"], lora["zero-2"]
    assert full.weights == -(-est.weights_bytes // 4) and zero2.weights == est.weights_bytes
    assert full.gradients == -(-est.gradients_bytes // 4) and full.optimizer == -(-est.optimizer_bytes // 4)


def test_offload_moves_the_configured_variants_shards_to_host_memory():
    est = _sharded(4, strategy="deepspeed", deepspeed={"zero_stage": 3, "offload": True}, fsdp={"offload": True})
    rows = _rows(est)
    assert list(rows)[-2:] == ["fsdp2 full + offload", "zero-3 + offload"] and est.configured.name == "zero-3 + offload"
    for name in ("fsdp2 full", "zero-3"):
        on, off = rows[name + " + offload"], rows[name]
        assert (on.weights, on.gradients, on.optimizer) == (0, 0, 0) and on.gathered == off.gathered
        assert on.offloaded == off.weights + off.gradients + off.optimizer
    zero2 = _rows(_sharded(4, strategy="deepspeed", deepspeed={"zero_stage": 2, "offload": True}))["zero-2 + offload"]
    assert zero2.optimizer == 0 and zero2.offloaded == _rows(est)["zero-2"].optimizer  # stage 2 offloads the optimizer only


def test_one_process_is_the_single_process_estimate(monkeypatch):
    """With one process no strategy runs: every row is weights + gradients + optimizer + activations, the
    figure and verdict of the one-process estimate; the default number of processes is the launcher's."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    est = _sharded(None, strategy="fsdp2", fsdp={"offload": True})
    assert est.processes == 1 and est.process_micro_batch == 8 and len(est.strategies) == 7
    for row in est.strategies:
        assert row.device_bytes == est.required_bytes and (row.gathered, row.buffers, row.offloaded) == (0, 0, 0)
        assert row.activations == est.activations_bytes
    tight = _sharded(None, available=est.required_bytes - 1)
    assert not tight.fits and not any(row.fits for row in tight.strategies) and _sharded(None, available=est.required_bytes).fits
    assert "per process" not in "\n".join(est.lines()) and "(fsdp2" not in str(est)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _sharded(None).processes == 2


def test_the_fit_verdict_flips_where_the_numbers_say(monkeypatch):
    """On a CPU the processes share this machine's memory: a strategy fits when processes x its bytes do.
    Between ZeRO-3's need and DDP's, DDP does not fit and ZeRO-3 does, and `fits` is the configured one's."""
    from gemcut.train.strategy_memory import ModelBytes, strategy_table

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    per = {row.name: row.device_bytes for row in _sharded(4).strategies}
    between = 4 * (per["zero-3"] + per["ddp"]) // 2
    ddp = _sharded(4, available=between)
    zero3 = _sharded(4, available=between, strategy="deepspeed", deepspeed={"zero_stage": 3})
    assert not ddp.fits and zero3.fits and "does not fit" in str(ddp) and "(zero-3, 4 processes)" in str(zero3)
    assert {r.name: r.fits for r in ddp.strategies} == {r.name: r.fits for r in zero3.strategies}
    assert not _rows(ddp)["ddp"].fits and _rows(ddp)["zero-3"].fits
    assert _sharded(4, available=4 * per["ddp"]).fits and not _sharded(4, available=4 * per["ddp"] - 1).fits
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes of two: this machine holds two of the processes
    assert _sharded(4, available=2 * per["ddp"]).fits
    # On a GPU each process has its own device; offloaded bytes go to the host, whose memory they must fit.
    m = ModelBytes(weights=400, gradients=400, optimizer=800, activations=100, root=40, largest_block=40)
    row = lambda **kw: next(r for r in strategy_table(m, 4, RunConfig.model_validate(  # noqa: E731
        {"model": {"name": "x"}, "train": {"distributed": {"strategy": "fsdp2", "fsdp": {"offload": True}}}}).train.distributed,
        device="cuda", **kw) if r.configured)
    assert row(available=220, host_available=1600).fits  # device: 100 + 40 + 80 gathered; host: 4 x 400
    assert not row(available=219, host_available=1600).fits and not row(available=220, host_available=1599).fits


def test_cli_prints_the_strategies_for_the_processes(llama_dir, tmp_path):
    from typer.testing import CliRunner

    from gemcut.cli import app, register_commands

    register_commands()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{name: {llama_dir}}}\ntrain: {{max_steps: 3, batch_size: 4, "
                   "distributed: {strategy: fsdp2}}\ndata: {max_length: 16}\n")
    out = CliRunner().invoke(app, ["estimate", str(cfg), "--no-probe", "--processes", "2"])
    assert out.exit_code == 0, out.output
    assert "per process on 2 processes (activations of micro-batches of 2)" in out.output
    lines = out.output.splitlines()
    for name in ("ddp", "fsdp2 grad_op", "zero-1", "zero-2", "zero-3"):
        assert any(line.startswith(f"  {name} ") and line.endswith("fits") for line in lines), name
    assert any(line.startswith("* fsdp2 full ") for line in lines)
    out = CliRunner().invoke(app, ["estimate", str(cfg), "--no-probe", "--processes", "2", "--json"])
    data = json.loads(out.stdout)
    assert data["processes"] == 2 and [r["name"] for r in data["strategies"] if r["configured"]] == ["fsdp2 full"]
    assert len(data["strategies"]) == 6 and all(r["device_bytes"] > 0 and r["fits"] for r in data["strategies"])
