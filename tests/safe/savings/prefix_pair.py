"""Two copies of one tiny model stepped side by side, one caching its frozen prefix and one not (whose prefix is put
in eval mode by hand, which is what the cache promises to equal): the helpers of the prefix cache's tests."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

LAYERS = 4
EXAMPLES = 8
BATCH = 4
LENGTHS = (3, 8, 5, 6, 4, 7, 8, 2)  # dynamic padding: every batch is padded to its own longest example


def build(tiny, arch: str, cache: bool, checkpointing: str | None = None, **kwargs) -> PeftModel:
    """SAFE over LoRA (dropout 0.1) on a tiny model in train mode, units 0 and 1 frozen (the cut at block 2)."""
    base = tiny.model(arch, layers=LAYERS)
    if checkpointing is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
            )
    kwargs.setdefault("schedule_unit", "step")
    config = tiny.safe_config(arch, lora=tiny.lora(arch, lora_dropout=0.1), cache_frozen=cache, **kwargs)
    torch.manual_seed(1)
    model = get_peft_model(base, config)
    model.base_model.auto_driver.stand_down("the tests freeze by hand")
    model.train()
    model.base_model.freeze([0, 1])
    return model


def blocks(model: PeftModel) -> torch.nn.ModuleList:
    inner = model.base_model.model
    return inner.bert.encoder.layer if hasattr(inner, "bert") else inner.model.layers


def prefix_in_eval_mode(model: PeftModel) -> None:
    """What the cache does while it caches, done by hand on the uncached reference: no dropout in the prefix."""
    cut = int(model.base_model.backprop_cut_block.rsplit(".", 1)[1])
    for block in blocks(model)[:cut]:
        block.eval()
    inner = model.base_model.model
    if hasattr(inner, "bert"):
        inner.bert.embeddings.dropout.eval()


def examples(arch: str, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, length in enumerate(LENGTHS):
        ids = torch.randint(4, 100, (length,), generator=gen)
        label = torch.tensor(i % 2) if arch == "bert" else ids.clone()
        out.append({"input_ids": ids, "labels": label})
    return out


def collate(rows: list[dict[str, torch.Tensor]], arch: str, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest row (right by default), the attention mask 0 and the LM labels -100 on padding."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100) if arch != "bert" else torch.stack([r["labels"] for r in rows])
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        span = slice(width - n, width) if left else slice(0, n)
        ids[i, span], mask[i, span] = r["input_ids"], 1
        if arch != "bert":
            labels[i, span] = r["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_batches(arch: str, epoch: int) -> list[dict[str, torch.Tensor]]:
    rows = examples(arch)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(100 + epoch)).tolist()
    return [collate([rows[i] for i in order[j : j + BATCH]], arch) for j in range(0, len(order), BATCH)]


class Pair:
    """A caching model and its uncached reference, stepped together."""

    def __init__(self, tiny, arch: str, checkpointing: str | None = None, **kwargs) -> None:
        self.arch = arch
        self.cached = build(tiny, arch, True, checkpointing, **kwargs)
        self.plain = build(tiny, arch, False, checkpointing)
        prefix_in_eval_mode(self.plain)
        self.optimizers = [
            torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in self.models
        ]
        self.steps = 0

    @property
    def models(self) -> tuple[PeftModel, PeftModel]:
        return self.cached, self.plain

    @property
    def stats(self) -> dict:
        return self.cached.base_model.prefix_cache.stats()

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        losses = []
        for model, optimizer in zip(self.models, self.optimizers):
            torch.manual_seed(1000 + self.steps)  # the same dropout above the cut in both
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        self.steps += 1
        return losses[0], losses[1]

    def epoch(self, epoch: int) -> None:
        for batch in epoch_batches(self.arch, epoch):
            cached, plain = self.step(batch)
            assert cached == pytest.approx(plain, abs=1e-5), f"epoch {epoch}: {cached} != {plain}"

    def freeze(self, units: list[int]) -> None:
        for model, optimizer in zip(self.models, self.optimizers):
            model.base_model.freeze(units, optimizer=optimizer)
        prefix_in_eval_mode(self.plain)

    def assert_same_adapters(self, tiny) -> None:
        cached, plain = (tiny.adapter_params(m) for m in self.models)
        assert cached.keys() == plain.keys() and cached
        for name in cached:
            torch.testing.assert_close(cached[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def calls_of(module: torch.nn.Module) -> list[int]:
    counter = [0]
    module.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter
