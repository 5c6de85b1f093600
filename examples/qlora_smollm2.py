"""QLoRA against QLoRA + SAFE: SmolLM2-135M in 4 bits, fine-tuned as a causal LM on WikiText-2.

    python examples/qlora_smollm2.py                  # CPU default: 64-token blocks, 16 steps of 2 per run (minutes)
    python examples/qlora_smollm2.py --full           # 256-token blocks, 600 steps of 4, 256 validation blocks
    python examples/qlora_smollm2.py --steps 60 --seq-len 128 --checkpointing non-reentrant
    python examples/qlora_smollm2.py --cost-table     # one step's costs: LoRA vs bottom half frozen, cut on/off

Both runs start from the same 4-bit base (NF4, float32 compute on the CPU; bfloat16 with ``--compute-dtype``),
prepared by peft's ``prepare_model_for_kbit_training`` with gradient checkpointing, with LoRA on the attention
and MLP projections of all 30 blocks, and see the same seed and the same packed token blocks in the same order.
The SAFE run scores its units every ``--scoring-interval`` optimizer steps and freezes on a step-based cubic
schedule. Printed per run: validation perplexity before and after, and for one training step before and after
freezing the saved-activation bytes (what autograd keeps from forward to backward, checkpointed block inputs
included) and the FLOPs (forward and backward, recompute included), plus which units froze when.

Needs the offline assets (``SAFE_ASSETS=all bash scripts/setup.sh``): SmolLM2 (``peft_safe.assets.smollm2_path``)
and WikiText-2 (``peft_safe.assets.load_wikitext2``). See docs/qlora.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import warnings

import torch


def packed_blocks(tokenizer, lines: list[str], seq_len: int, max_blocks: int | None) -> torch.Tensor:
    """Tokenize the lines as one stream and cut it into ``seq_len``-token blocks (the remainder is dropped)."""
    text = "".join(lines)
    if max_blocks is not None:  # tokenize only what is needed (about 4 characters per token, with margin)
        text = text[: max_blocks * seq_len * 8]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n_blocks = len(ids) // seq_len if max_blocks is None else min(len(ids) // seq_len, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"the text gives fewer than {seq_len} tokens; lower --seq-len.")
    return ids[: n_blocks * seq_len].view(n_blocks, seq_len)


def load_base(path: str, compute_dtype: torch.dtype, checkpointing: str):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=compute_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing != "none",
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"},
        )
    model.config.use_cache = False
    return model


def step_costs(model, batch: dict) -> dict[str, float]:
    """Saved-activation bytes and FLOPs of one forward + backward (no optimizer step: the weights stay put)."""
    from peft_safe.measure import measure_training_step

    m = measure_training_step(model, batch, optimizer=None, timed=False)
    return {"activation_MiB": m.activation_bytes / 2**20, "fwd_GFLOP": m.forward_flops / 1e9,
            "bwd_GFLOP": m.backward_flops / 1e9, "trainable_params": m.trainable_parameter_bytes // 4}


def run(args, name: str, train: torch.Tensor, valid: torch.Tensor, probe: list[dict], base_ppl: float | None):
    from peft import LoraConfig, get_peft_model

    from peft_safe import SAFEConfig
    from peft_safe.assets import smollm2_path
    from peft_safe.bench.runs import perplexity

    compute_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.compute_dtype]
    model = load_base(smollm2_path(), compute_dtype, args.checkpointing)
    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    config = lora
    if name == "qlora+safe":
        config = SAFEConfig(
            adapter_config=lora, tau=args.tau, schedule_unit="step", scoring_interval=args.scoring_interval,
            final_freeze_time=args.final_freeze_step, task_type="CAUSAL_LM", seed=args.seed,
        )
    torch.manual_seed(args.seed)
    model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    measure_batch = {"input_ids": train[: args.batch_size], "labels": train[: args.batch_size]}
    before = step_costs(model, measure_batch)
    if base_ppl is None:
        base_ppl = perplexity(model, valid, args.batch_size)  # LoRA starts as a no-op: the base model's perplexity

    started = time.perf_counter()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    for step in range(1, args.steps + 1):
        rows = order[((step - 1) * args.batch_size + torch.arange(args.batch_size)) % len(train)]
        ids = train[rows]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if name == "qlora+safe" and step % args.scoring_interval == 0:
            safe = model.base_model
            newly = safe.update_and_freeze(step, probe, optimizer=optimizer)
            if newly:
                print(f"  [{name}] step {step}: froze {len(newly)} units {_short(newly)} "
                      f"(threshold {safe.threshold(step):.3f}, cut at {safe.backprop_cut_block})")
        if step % max(1, args.steps // 6) == 0 or step == args.steps:
            elapsed = time.perf_counter() - started
            print(f"  [{name}] step {step}/{args.steps}: loss {loss.item():.3f} ({elapsed:.0f} s)")
    train_time = time.perf_counter() - started
    after = step_costs(model, measure_batch)
    result = {"name": name, "ppl_before": base_ppl, "ppl_after": perplexity(model, valid, args.batch_size),
              "before": before, "after": after, "train_s": train_time}
    if name == "qlora+safe":
        safe = model.base_model
        result["frozen"] = dict(safe.freeze_state.frozen)
        result["units"] = len(safe.adapter_units)
        result["cut"] = safe.backprop_cut_block
        latest: dict[str, float] = {}
        for record in safe.freeze_state.history:  # a frozen unit keeps the score it had when last scored
            latest.update(record["scores"])
        result["importance"] = latest
    return result


def cost_table(args, train: torch.Tensor) -> None:
    """One step's saved-activation bytes and FLOPs: LoRA, then the bottom half of the units frozen with SAFE's
    cut and with the cut removed (what peft's input-require-grads hook alone gives), per checkpointing mode."""
    from peft import LoraConfig, get_peft_model

    from peft_safe import SAFEConfig
    from peft_safe.assets import smollm2_path

    compute_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.compute_dtype]
    batch = {"input_ids": train[: args.batch_size], "labels": train[: args.batch_size]}
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    print("| checkpointing | run | activation MiB | fwd GFLOP | bwd GFLOP |")
    print("|---|---|---|---|---|")
    for checkpointing in ("none", "reentrant", "non-reentrant"):
        for run_name in ("all trainable", "bottom half frozen, SAFE cut", "bottom half frozen, no cut"):
            torch.manual_seed(args.seed)
            model = get_peft_model(load_base(smollm2_path(), compute_dtype, checkpointing),
                                   SAFEConfig(adapter_config=lora, task_type="CAUSAL_LM"))
            model.train()
            if checkpointing == "none":
                model.enable_input_require_grads()  # as prepare_model_for_kbit_training does with checkpointing
            safe = model.base_model
            if run_name != "all trainable":
                safe.freeze(safe.adapter_units[: len(safe.adapter_units) // 2])
            no_cut = safe.without_backprop_cut() if run_name.endswith("no cut") else contextlib.nullcontext()
            with no_cut:
                costs = step_costs(model, batch)
            print(f"| {checkpointing} | {run_name} | {costs['activation_MiB']:.2f} | {costs['fwd_GFLOP']:.2f} | "
                  f"{costs['bwd_GFLOP']:.2f} |", flush=True)


def _short(units: list[str]) -> str:
    return "[" + ", ".join(u.rsplit(".", 1)[-1] for u in units) + "]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="a longer run: 256-token blocks, 600 steps, 256 validation blocks")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 16; 600 with --full)")
    parser.add_argument("--seq-len", type=int, help="tokens per packed block (default 64; 256 with --full)")
    parser.add_argument("--batch-size", type=int, help="blocks per step (default 2; 4 with --full)")
    parser.add_argument("--valid-blocks", type=int,
                        help="validation blocks for perplexity (default 16; 256 with --full)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tau", type=float, default=0.3, help="final threshold on normalised importance")
    parser.add_argument("--scoring-interval", type=int, help="steps between scorings (default steps // 8)")
    parser.add_argument("--cost-table", action="store_true",
                        help="only measure one step: all units trainable vs bottom half frozen, SAFE's cut on and off")
    parser.add_argument("--final-freeze-step", type=int, help="t_f in steps (default 60 %% of --steps)")
    parser.add_argument("--probe-blocks", type=int, default=4, help="blocks in the probe set used for scoring")
    parser.add_argument("--checkpointing", choices=["reentrant", "non-reentrant", "none"], default="reentrant",
                        help="gradient checkpointing of prepare_model_for_kbit_training (peft's default is reentrant)")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.steps = args.steps or (600 if args.full else 16)
    args.batch_size = args.batch_size or (4 if args.full else 2)
    args.seq_len = args.seq_len or (256 if args.full else 64)
    args.valid_blocks = args.valid_blocks or (256 if args.full else 16)
    args.scoring_interval = args.scoring_interval or max(1, args.steps // 8)
    args.final_freeze_step = args.final_freeze_step or max(2 * args.scoring_interval, int(0.6 * args.steps))
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*use_reentrant.*|None of the inputs have requires_grad.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    from transformers import AutoTokenizer

    import peft_safe  # noqa: F401  (registers the SAFE peft type)
    from peft_safe.assets import load_wikitext2, smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    n_train = args.steps * args.batch_size + args.probe_blocks
    train = packed_blocks(tokenizer, load_wikitext2("train"), args.seq_len, None if args.full else n_train)
    valid = packed_blocks(tokenizer, load_wikitext2("validation"), args.seq_len, args.valid_blocks)
    probe_ids = train[-args.probe_blocks :]  # held out from the training order below
    train = train[: -args.probe_blocks]
    probe = [{"input_ids": probe_ids[i : i + args.batch_size]} for i in range(0, len(probe_ids), args.batch_size)]
    print(f"SmolLM2-135M, NF4 4-bit ({args.compute_dtype} compute), LoRA r={args.rank} on q/k/v/o/gate/up/down; "
          f"checkpointing: {args.checkpointing}")
    print(f"WikiText-2: {len(train)} train blocks x {args.seq_len} tokens, {len(valid)} validation blocks; "
          f"{args.steps} steps of batch {args.batch_size}; SAFE tau={args.tau}, scoring every "
          f"{args.scoring_interval} steps, t_f={args.final_freeze_step}")

    if args.cost_table:
        cost_table(args, train)
        return
    results = []
    for name in ("qlora", "qlora+safe"):
        print(f"== {name}")
        results.append(run(args, name, train, valid, probe, results[0]["ppl_before"] if results else None))

    print("\n| run | val ppl before | val ppl after | trainable params (end) | activation MiB/step | "
          "fwd GFLOP/step | bwd GFLOP/step | train time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        b, a = r["before"], r["after"]
        print(f"| {r['name']} | {r['ppl_before']:.2f} | {r['ppl_after']:.2f} | {a['trainable_params']:,} | "
              f"{b['activation_MiB']:.2f} -> {a['activation_MiB']:.2f} | "
              f"{b['fwd_GFLOP']:.2f} -> {a['fwd_GFLOP']:.2f} | "
              f"{b['bwd_GFLOP']:.2f} -> {a['bwd_GFLOP']:.2f} | {r['train_s']:.0f} s |")
    safe = results[1]
    frozen = sorted(safe["frozen"].items(), key=lambda kv: int(kv[0].rsplit(".", 1)[-1]))
    print(f"\nSAFE froze {len(frozen)}/{safe['units']} units; backprop cut at {safe['cut']}")
    by_step: dict = {}
    for unit, at in frozen:
        by_step.setdefault(at, []).append(unit.rsplit(".", 1)[-1])
    for at, blocks in sorted(by_step.items()):
        print(f"  step {at:g}: blocks {', '.join(blocks)}")
    top = max(safe["importance"].values()) or 1.0
    scores = sorted(safe["importance"].items(), key=lambda kv: int(kv[0].rsplit(".", 1)[-1]))
    print("latest importance per block, normalised to the top unit: "
          + " ".join(f"{u.rsplit('.', 1)[-1]}:{v / top:.2f}" for u, v in scores))
    print(f"train time ratio SAFE / QLoRA: {safe['train_s'] / results[0]['train_s']:.2f} (this machine, this run)")


if __name__ == "__main__":
    main()
