"""SAFECallback takes its probe set in the shapes TRL users have (issue 14.3): a raw {"text"} dataset, TRL's own
tokenised train_dataset (ragged lists, a ``text`` column, sequence labels), a list of strings, prompt/completion
text, or none at all (a held slice of the training data). Each used to fail with an unhelpful error."""

from __future__ import annotations

import pytest
from peft import LoraConfig
from tiny_models import tiny_texts, tiny_tokenizer

from peft_safe import SAFECallback, SAFEConfig

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def ragged_texts(n: int, seed: int) -> list[str]:
    return [" ".join(text.split()[: 4 + i % 7]) for i, text in enumerate(tiny_texts(n, seed=seed))]


def sft_trainer(tiny, tmp_path):
    config = SAFEConfig(
        adapter_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        task_type="CAUSAL_LM", schedule_unit="step", scoring_interval=2, final_freeze_time=6, warmup_cap=2,
    )
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, save_strategy="no", max_length=16, disable_tqdm=True,
                         dataloader_num_workers=0)
    return trl.SFTTrainer(model=tiny.llama(layers=2).train(), args=args, processing_class=tiny_tokenizer(),
                          train_dataset=datasets.Dataset.from_dict({"text": ragged_texts(16, 0)}),
                          peft_config=config)


SHAPES = {
    "text-dataset": lambda trainer: datasets.Dataset.from_dict({"text": ragged_texts(8, 5)}),
    "trl-train_dataset": lambda trainer: trainer.train_dataset,
    "list-of-strings": lambda trainer: ragged_texts(8, 5),
    "prompt-completion": lambda trainer: [{"prompt": p, "completion": " w5 w6"} for p in ragged_texts(8, 5)],
    "none": lambda trainer: None,
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_probe_sets_in_trl_shapes_are_accepted(tiny, tmp_path, shape):
    trainer = sft_trainer(tiny, tmp_path)
    callback = SAFECallback(SHAPES[shape](trainer), batch_size=4)
    trainer.add_callback(callback)
    trainer.train()
    assert [h["t"] for h in trainer.model.base_model.freeze_state.history] == [2]
    for batch in callback._probe_batches:
        assert batch["input_ids"].dim() == 2 and "text" not in batch


def test_examples_without_text_or_model_inputs_name_the_fix(tiny, tmp_path):
    trainer = sft_trainer(tiny, tmp_path)
    trainer.add_callback(SAFECallback([{"question": 1}, {"question": 2}]))
    with pytest.raises(ValueError, match=r"keys \['question'\].*tokenize them first"):
        trainer.train()
