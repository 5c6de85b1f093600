"""Where one SAFE scoring's time goes (issue 24, item 4): the probe forwards against the CKA, float64 against
float32, on the bench's model as a user runs it.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python scripts/profile_scoring.py --task wikitext2 \
        --probe-size 8 --max-length 128 --probe-tokens 1024 [--profile-json docs/results/profile-scoring.json]

Builds the bench's SAFE model (``peft-safe bench`` flags: --task, --probe-size, --max-length, ...) with LoRA's
B drawn small (a scoring's cost does not depend on the weights; its scores need adapters that do something), then
times, each ``--repeats`` times: one training step of the bench's batch, the probe set's forward alone (no grad,
eval mode), and one scoring in each CKA precision, whose scores are compared. Prints one line per figure;
--profile-json writes them. Times mean something only on an otherwise idle machine.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str]) -> int:
    from peft_safe.batch import call_model
    from peft_safe.bench.cli import _check_args, build_parser
    from peft_safe.bench.data import iter_batches, prepare_task
    from peft_safe.bench.runs import build_model, total_steps_of

    parser = build_parser()
    parser.add_argument("--probe-tokens", type=int, default=None, help="SAFEConfig.probe_tokens (default 4096)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile-json", help="write the figures here")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    task = prepare_task(args, 0)
    model = build_model(task, "lora", True, args, 0, total_steps_of(task, args))
    safe = model.base_model
    safe.auto_driver.stand_down("the profile scores by hand")
    if args.probe_tokens is not None:
        safe.peft_config[safe.active_adapters[0]].probe_tokens = args.probe_tokens
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters as after some training (LoRA's B starts at 0: every score would be 0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(1e-2 * torch.randn(param.shape, generator=generator))
    probe = list(iter_batches(task.probe, args.batch_size, device=args.device))
    train = next(iter(iter_batches(task.train, args.batch_size, device=args.device)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        model(**train).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forwards():
        with torch.no_grad():
            model.eval()
            for batch in probe:
                call_model(model, batch)
            model.train()

    figures = {"units": len(safe.adapter_units), "probe_batches": len(probe),
               "probe_tokens": safe.safe_config.probe_tokens, "threads": torch.get_num_threads(),
               "train_step_s": _timed(step, args.repeats), "probe_forwards_s": _timed(forwards, args.repeats)}
    scores = {}
    config = safe.peft_config[safe.active_adapters[0]]
    for precision in ("float64", "float32"):
        config.cka_precision = precision

        def scoring(precision: str = precision) -> None:
            scores[precision] = safe.compute_importance(probe)

        figures[f"scoring_{precision}_s"] = _timed(scoring, args.repeats)
    worst = max((abs(scores["float32"][u] - scores["float64"][u]) / scores["float64"][u]
                 for u in scores["float64"] if scores["float64"][u] > 1e-8), default=0.0)
    figures["largest_relative_score_gap"] = worst
    figures["same_ranking"] = sorted(scores["float64"], key=scores["float64"].get) == sorted(
        scores["float32"], key=scores["float32"].get)
    for key, value in figures.items():
        print(f"{key:28} {value:.4g}" if isinstance(value, float) else f"{key:28} {value}")
    step_s = figures["train_step_s"]
    for precision in ("float64", "float32"):
        print(f"one scoring in {precision} costs {figures[f'scoring_{precision}_s'] / step_s:.1f} training steps")
    if args.profile_json:
        with open(args.profile_json, "w") as handle:
            json.dump(figures, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
