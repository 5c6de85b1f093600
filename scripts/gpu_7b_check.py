"""The GPU check of issue 24, for a session lent a CUDA device: a LLaMA-2-7B-shaped model (random weights) in 4 bits,
batch 4 x 512 tokens, LoRA under SAFE with 0, 8, 16 and 24 bottom blocks frozen: CUDA peak memory and step time of
each beside ``peft-safe plan``'s prediction for the same shape and setting, and one scoring's time in each CKA
precision (float64, the reference, against float32's difference form) with the scores compared.

    python scripts/gpu_7b_check.py --json docs/results/gpu-7b-check.json          # on the GPU machine, ~5 min
    python scripts/gpu_7b_check.py --model /tmp/tiny/config.json --device cpu \
        --batch-size 2 --seq-len 32 --frozen 0,1,2 --probe-seq 16   # the same code path on a CPU, tiny

0 blocks frozen is QLoRA's own training (the same adapters, all trainable; SAFE adds its hooks only). The model is
built as ``peft-safe plan --validate`` builds it (random bfloat16 weights saved, loaded back in NF4 with double
quantization, ``prepare_model_for_kbit_training`` without checkpointing, float32 activations and adapters), so the
plan's figures are for exactly this setting. Times are medians over ``--repeats`` steps after a warm-up step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch


def build(shape, settings, device: str, workdir: str):
    """``peft-safe plan --validate``'s model, on ``device``: SAFE over LoRA, its automatic schedule standing down."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from peft_safe import SAFEConfig

    config = shape.to_llama_config(max_position_embeddings=max(64, settings.seq_len))
    torch.manual_seed(0)
    with torch.device(device):  # random weights made where they will live: seconds on a GPU for 7B
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(workdir)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(workdir, quantization_config=quantization, dtype=torch.float32,
                                             device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r, target_modules=list(settings.target_modules),
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, SAFEConfig(adapter_config=lora, task_type="CAUSAL_LM"))
    model.base_model.auto_driver.stand_down("the check freezes by hand")
    model.base_model.model.disable_input_require_grads()  # as plan --validate measures (the plan's setting)
    return model


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str]) -> int:
    from peft_safe.plan.formulas import plan_memory
    from peft_safe.plan.shapes import ALL_PROJECTIONS, PlanSettings, resolve_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-2-7b", help="a plan preset, a config.json or a model folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--frozen", default="0,8,16,24", help="bottom blocks frozen, ascending, comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--probe-batch", type=int, default=8, help="probe sequences (the bench's: 8 of 128 tokens)")
    p.add_argument("--probe-seq", type=int, default=128)
    p.add_argument("--all-projections", action="store_true", help="LoRA on every projection (default: the plan's)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    shape = resolve_model(args.model)
    extra = {"target_modules": ALL_PROJECTIONS} if args.all_projections else {}
    settings = PlanSettings(bits=4, batch_size=args.batch_size, seq_len=args.seq_len, **extra)
    frozen = sorted(int(k) for k in args.frozen.split(","))
    plan = {(r.method, r.frozen_blocks): r for r in plan_memory(shape, settings)}
    figures: dict = {"model": shape.name, "device": args.device, "settings": vars(args), "rows": []}
    if args.device.startswith("cuda"):
        figures["gpu"] = torch.cuda.get_device_name(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        model = build(shape, settings, args.device, workdir)
    figures["build_s"] = time.perf_counter() - start
    safe = model.base_model
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, shape.vocab_size, (args.batch_size, args.seq_len), generator=generator).to(args.device)
    probe_ids = torch.randint(1, shape.vocab_size, (args.probe_batch, args.probe_seq), generator=generator)
    probe = [{"input_ids": probe_ids.to(args.device), "attention_mask": torch.ones_like(probe_ids).to(args.device)}]

    # one scoring, before any freezing, with adapters that do something (LoRA's B starts at 0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(1e-2 * torch.randn(param.shape, generator=generator).to(param.device, param.dtype))
    config = safe.safe_config
    scores = {}
    for precision in ("float64", "float32", "float64"):  # the first float64 scoring warms the kernels up
        config.cka_precision = precision
        synchronize(args.device)
        begin = time.perf_counter()
        scores[precision] = safe.compute_importance(probe)
        synchronize(args.device)
        figures[f"scoring_{precision}_s"] = time.perf_counter() - begin
    ref, new = scores["float64"], scores["float32"]
    figures["scoring_largest_relative_gap"] = max(abs(new[u] - ref[u]) / ref[u] for u in ref if ref[u] > 1e-8)
    figures["scoring_same_ranking"] = sorted(ref, key=ref.get) == sorted(new, key=new.get)

    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for k in frozen:
        if k:
            safe.freeze(list(range(k)), optimizer=optimizer)
        step()  # warm-up: the optimizer state of what trains now
        synchronize(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            synchronize(args.device)
            begin = time.perf_counter()
            step()
            synchronize(args.device)
            times.append(time.perf_counter() - begin)
        planned = plan[("lora", 0)] if k == 0 else plan[("safe", k)]
        row = {"frozen_blocks": k, "step_s": statistics.median(times), "cut_block": safe.backprop_cut_block,
               "planned_total_bytes": planned.total_bytes, "planned": planned.to_dict(),
               "cuda_peak_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None}
        figures["rows"].append(row)
        peak = "-" if row["cuda_peak_bytes"] is None else f"{row['cuda_peak_bytes'] / 2**30:.2f} GiB"
        print(f"frozen {k:>2}: step {row['step_s']:.3f} s, CUDA peak {peak}, planned "
              f"{planned.total_bytes / 2**30:.2f} GiB, cut at {row['cut_block']}", flush=True)
    print(f"one scoring: float64 {figures['scoring_float64_s']:.2f} s, float32 {figures['scoring_float32_s']:.2f} s "
          f"(largest relative gap {figures['scoring_largest_relative_gap']:.2e}, same ranking "
          f"{figures['scoring_same_ranking']}); build {figures['build_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
