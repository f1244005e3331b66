"""The callbacks' scalars reach TensorBoard event files, and the plain-loop helper writes the same tags."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments  # noqa: E402

import kacq_hooks as kh  # noqa: E402
from kacq_hooks import facts  # noqa: E402
from kacq_hooks.training.callbacks import FactTrackingCallback, KnowledgeEntropyCallback  # noqa: E402
from kacq_hooks.training.logging import log_facts, log_knowledge_entropy  # noqa: E402
from tiny_models import VOCAB, tiny_model  # noqa: E402


def _fact_set():
    def record(context, inputs, targets):
        probes = {f"{k}_{p}": list(inputs if p == "input" else targets)
                  for k in facts.PROBE_KINDS for p in ("input", "target")}
        return facts.FactRecord(context, **probes)
    return facts.FactSet([record("Zorgon was founded in 1842.", ["Zorgon was founded in"], ["1842"])], ["once"])


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    files = sorted(directory.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {directory}"
    found: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return found


def test_callback_scalars_land_in_tensorboard_event_files(tmp_path, tokenizer):
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(2, VOCAB, (24,), generator=generator).tolist()} for _ in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=["tensorboard"], logging_steps=1000, save_strategy="no",
                             use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    entropy = KnowledgeEntropyCallback(every=2).attach(trainer)
    tracker = facts.FactTracker(model, tokenizer, _fact_set())
    FactTrackingCallback(tracker, every=2).attach(trainer)
    trainer.train()
    scalars = _scalars(tmp_path / "out")
    expected = {"knowledge_entropy/total", "knowledge_entropy/decoder.layer_0", "knowledge_entropy/decoder.layer_1",
                "facts/mem", "facts/gen", "facts/hard_gen", "facts/once/mem"}
    tags = {tag.removeprefix("train/") for tag in scalars}  # the Trainer writes its logs under train/
    assert expected <= tags, sorted(tags)
    total = scalars.get("train/knowledge_entropy/total") or scalars["knowledge_entropy/total"]
    assert [step for step, _ in total] == [2, 4]
    assert [value for _, value in total] == pytest.approx([h.total for _, h in entropy.history], rel=1e-6)


def test_plain_loop_helper_writes_the_callbacks_tags(tmp_path, tokenizer):
    model = tiny_model("llama")
    tracker = facts.FactTracker(model, tokenizer, _fact_set())
    ids = torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kh.instrument(model) as inst:
        model(ids)
    with SummaryWriter(str(tmp_path / "plain")) as writer:
        written = log_knowledge_entropy(writer, inst.knowledge_entropy(), 3)
        written |= log_facts(writer, tracker, 3)
    scalars = _scalars(tmp_path / "plain")
    assert set(scalars) == set(written)
    assert {"knowledge_entropy/total", "knowledge_entropy/decoder.layer_1", "facts/mem", "facts/once/gen"} <= set(scalars)
    assert scalars["knowledge_entropy/total"] == [(3, pytest.approx(inst.knowledge_entropy().total, rel=1e-6))]
