"""The TRL recipe: SmolLM2-135M in 4 bits, TRL's SFTTrainer, ``peft_config=SAFEConfig(...)`` and nothing else.

    python examples/sft_qlora.py                # SmolLM2-135M (NF4) on WikiText-2 lines, 200 steps
    python examples/sft_qlora.py --steps 600 --max-length 256
    python examples/sft_qlora.py --tiny         # a tiny random LLaMA, in seconds (what CI runs)
    python examples/sft_qlora.py --adapter lora # the same run as plain QLoRA, to compare

Each run ends with one line: its steps and time, the training loss of its last steps, the loss and perplexity on
held-out lines (WikiText-2 validation) and the trainable parameters left.

Against a plain QLoRA run the only change is ``peft_config=SAFEConfig(adapter_config=LoraConfig(...))`` instead
of ``peft_config=LoraConfig(...)``: no callback, no probe set. SAFE keeps a few of the training batches as its
probe set, scores its units every ``--scoring-interval`` optimizer steps, freezes the least important ones and
takes them out of the Trainer's optimizer; its ``safe/*`` figures go wherever ``--report-to`` sends the Trainer's
logs. The saved adapter holds the freeze state, and its model card says to ``import peft_safe`` before loading.

The full run needs the offline assets (``SAFE_ASSETS=all bash scripts/setup.sh``): SmolLM2
(``peft_safe.assets.smollm2_path``) and WikiText-2 (``peft_safe.assets.load_wikitext2``).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch


def tiny_base(directory: str):
    """A tiny random LLaMA saved in ``directory`` with a word-level tokenizer: the --tiny stand-in for SmolLM2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{f"w{i}": i for i in range(4, 100)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{i}" for i in torch.randint(4, 100, (16,), generator=generator).tolist())
             for _ in range(64)]
    return texts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random LLaMA instead of SmolLM2 (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (200; --tiny: 12)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--scoring-interval", type=int, default=None, help="steps between scorings (25; --tiny: 2)")
    parser.add_argument("--tau", type=float, default=0.3, help="the freezing threshold's end value (the bench's)")
    parser.add_argument("--probe-tokens", type=int, default=1024,
                        help="tokens SAFE keeps from the first training batches to score on")
    parser.add_argument("--adapter", choices=["safe", "lora"], default="safe",
                        help="safe: peft_config=SAFEConfig(adapter_config=lora); lora: peft_config=lora")
    parser.add_argument("--eval-size", type=int, default=None, help="held-out lines evaluated (128; --tiny: 16)")
    parser.add_argument("--report-to", default="none", help="the Trainer's report_to, e.g. tensorboard")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    import peft_safe  # noqa: F401  (registers SAFE with peft)
    from peft_safe import SAFEConfig

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="sft_qlora_")
    steps = args.steps or (12 if args.tiny else 200)
    interval = args.scoring_interval or (2 if args.tiny else 25)
    eval_size = args.eval_size or (16 if args.tiny else 128)
    if args.tiny:
        model_path = os.path.join(output_dir, "tiny-base")
        texts = tiny_base(model_path)
        texts, held_out = texts[:-eval_size], texts[-eval_size:]
    else:
        from peft_safe.assets import load_wikitext2, smollm2_path

        model_path = smollm2_path()
        texts = [line for line in load_wikitext2("train") if len(line.split()) > 8]
        held_out = [line for line in load_wikitext2("validation") if len(line.split()) > 8][:eval_size]

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quantization, dtype=torch.float32)
    if args.tiny:  # bitsandbytes' AVX512-BF16 CPU kernel refuses rows shorter than its 64-value block
        import bitsandbytes as bnb

        for layer in model.modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                layer.support_avx512bf16_for_cpu = False
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # the one SAFE-specific line: SAFE wraps the LoRA config and drives its own schedule in optimizer steps
    # a scoring runs the probe tokens through the model about twice: few of them, on 1,024 tokens
    peft_config = lora if args.adapter == "lora" else SAFEConfig(
        adapter_config=lora, schedule_unit="step", scoring_interval=interval, final_freeze_time=steps // 2,
        tau=args.tau, probe_tokens=args.probe_tokens, task_type="CAUSAL_LM")

    training_args = SFTConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size, learning_rate=2e-4,
        max_length=args.max_length, logging_steps=max(1, interval // 2), save_strategy="no",
        report_to=args.report_to, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        gradient_checkpointing=True, dataloader_num_workers=0, seed=0,
    )
    trainer = SFTTrainer(model=model, args=training_args, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"text": texts}),
                         eval_dataset=Dataset.from_dict({"text": held_out}), peft_config=peft_config)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    eval_loss = trainer.evaluate()["eval_loss"]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e][-5:]
    result = {"adapter": args.adapter, "steps": trainer.state.global_step, "train_seconds": seconds,
              "train_loss": sum(losses) / len(losses), "eval_loss": eval_loss, "perplexity": math.exp(eval_loss),
              "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}
    print(f"{args.adapter}: {result['steps']} steps in {seconds:.0f} s; training loss (last {len(losses)} logs) "
          f"{result['train_loss']:.4f}; held-out loss {eval_loss:.4f} (perplexity {result['perplexity']:.2f}, "
          f"{len(held_out)} lines); trainable parameters at the end {result['trainable_parameters']:,}")
    if args.adapter == "lora":
        return result

    safe = trainer.model.base_model
    print(f"trained {trainer.state.global_step} steps; frozen {len(safe.frozen_units)}/{len(safe.adapter_units)} "
          f"units: {safe.frozen_units}")
    for record in (e for e in trainer.state.log_history if "safe/t" in e):
        print(f"step {record['step']}: threshold {record['safe/threshold']:.3f}, "
              f"frozen {record['safe/frozen_units']} {record['safe/newly_frozen'] or ''}".rstrip())
    adapter_dir = os.path.join(output_dir, "adapter")
    trainer.save_model(adapter_dir)
    print(f"adapter saved to {adapter_dir} (load it after `import peft_safe`; see its README.md)")
    return {**result, "frozen_units": safe.frozen_units, "units": safe.adapter_units, "adapter_dir": adapter_dir}


if __name__ == "__main__":
    main()
