"""FactTracker: exact target log probs, batching and padding invariance, side-effect freedom, the trajectory store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kacq_hooks as kh
from kacq_hooks import facts
from tiny_models import tiny_model

DATA = Path(__file__).parents[1].parent / "shared/data/fictional_knowledge"
needs_data = pytest.mark.skipif(not DATA.exists(), reason="shared Fictional Knowledge data not present")

LONG = {"llama": {"max_position_embeddings": 512}, "gpt2": {"n_positions": 512}}


@pytest.fixture(scope="module")
def real_facts():
    if not DATA.exists():
        pytest.skip("shared Fictional Knowledge data not present")
    fs = facts.load_fictional_knowledge(DATA / "fictional_knowledge.json")
    return facts.FactSet([fs[0], fs[100]], ["paraphrase", "once"])


def _record(inputs, targets):
    probes = {f"{k}_{p}": list(inputs if p == "input" else targets) for k in facts.PROBE_KINDS for p in ("input", "target")}
    return facts.FactRecord("A passage about nothing.", **probes)


def _log_prob_by_hand(model, tokenizer, input_text, target_text):
    """Full-length forward on one unpadded probe; target tokens found by tokenizing the input alone."""
    ids = tokenizer(f"{input_text} {target_text}")["input_ids"]
    n_context = len(tokenizer(input_text)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    log_probs = logits.log_softmax(-1)
    per_token = [log_probs[p - 1, ids[p]] for p in range(n_context, len(ids))]
    return float(sum(per_token) / len(per_token)), float(per_token[0]), float(sum(per_token))


def test_scores_match_a_forward_by_hand(tokenizer):
    model = tiny_model("llama")
    fs = facts.FactSet([_record(["The quick brown fox jumps over the", "Zorgon was founded in"], ["lazy dog", "1842"])])
    tracker = facts.FactTracker(model, tokenizer, fs, kinds=["mem"], batch_size=2)
    assert tracker.tokenization.all_clean
    scores = tracker.score_probes()
    for column, (input_text, target_text) in enumerate(fs[0].probes("mem")):
        mean, first, total = _log_prob_by_hand(model, tokenizer, input_text, target_text)
        assert scores.mean[column].item() == pytest.approx(mean, abs=1e-5)
        assert scores.first[column].item() == pytest.approx(first, abs=1e-5)
        assert scores.sum[column].item() == pytest.approx(total, abs=1e-5)
    by_kind = tracker.score("first")
    assert list(by_kind) == ["mem"] and by_kind["mem"].shape == (1, 2) and by_kind["mem"].dtype == torch.float32


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # rotary and absolute positions
def test_batched_left_and_right_padding_match_one_at_a_time(tokenizer, real_facts, model_type):
    model = tiny_model(model_type, **LONG[model_type])
    single = facts.FactTracker(model, tokenizer, real_facts, batch_size=1).score_probes()
    assert single.mean.shape == (30,) and not torch.isnan(single.mean).any()
    for side in ("left", "right"):
        batched = facts.FactTracker(model, tokenizer, real_facts, batch_size=8, padding_side=side).score_probes()
        torch.testing.assert_close(batched.mean, single.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched.first, single.first, atol=1e-5, rtol=0)
        # sums run over up to ~50 target tokens of this tokenizer: the same 1e-5 per token
        torch.testing.assert_close(batched.sum, single.sum, atol=1e-5, rtol=1e-6)


def test_forwards_are_bounded_by_the_batch_size(tokenizer, real_facts):
    model = tiny_model("llama", **LONG["llama"])
    tracker = facts.FactTracker(model, tokenizer, real_facts, batch_size=4)
    shapes = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    try:
        tracker.score_probes()
    finally:
        handle.remove()
    assert sum(s[0] for s in shapes) == 30 and max(s[0] for s in shapes) == 4
    lengths = sorted((len(e.ids) for e in tracker.encoded), reverse=True)
    assert shapes[0][1] == lengths[0]  # longest first, padded only to the longest in its batch
    assert all(a[1] >= b[1] for a, b in zip(shapes, shapes[1:]))


def test_scoring_leaves_training_state_rng_and_instrumentation_alone(tokenizer):
    model = tiny_model("gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    fs = facts.FactSet([_record(["The quick brown fox jumps over the"], ["lazy dog"])])
    tracker = facts.FactTracker(model, tokenizer, fs, kinds=["mem"])
    expected = tracker.score_probes().mean  # model is in eval mode here
    model.train()
    model.transformer.h[1].eval()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    inst = kh.instrument(model)
    rng = torch.get_rng_state()
    try:
        with torch.enable_grad():
            scores = tracker.score_probes()
        assert torch.equal(torch.get_rng_state(), rng)
        assert [m.training for m in model.modules()] == flags
        torch.testing.assert_close(scores.mean, expected, atol=0, rtol=0)  # dropout was off
        assert not inst.is_paused and all(int(s.tokens) == 0 for s in inst.stats)
        model(torch.tensor([[5, 6, 7]]))
        assert all(int(s.tokens) == 3 for s in inst.stats)
    finally:
        inst.remove()


def _greedy_tokenizer():
    """A BPE without pre-tokenization whose merges cross spaces: "the m" is one token."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=60, min_frequency=1, special_tokens=["<eos>"],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz "))
    core.train_from_iterator(["the mat " * 50], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


def test_a_target_that_is_not_a_clean_suffix_is_reported(tokenizer):
    greedy = _greedy_tokenizer()
    fs = facts.FactSet([_record(["on the", "on"], ["mat", "the"])])
    model = tiny_model("llama")
    with pytest.raises(facts.ProbeTokenizationError, match=r"record 0, mem probe 0: .*not a clean token suffix"):
        facts.FactTracker(model, greedy, fs, unclean_targets="error")
    extended = facts.FactTracker(model, greedy, fs, kinds=["mem"], unclean_targets="extend")
    assert extended.tokenization.unclean == [0]
    probe = extended.encoded[0]
    assert greedy.convert_ids_to_tokens(list(probe.ids[probe.target_start:])) == ["the m", "at"]  # straddler scored
    nan_policy = facts.FactTracker(model, greedy, fs, kinds=["mem"], unclean_targets="nan").score_probes()
    assert torch.isnan(nan_policy.mean[0]) and not torch.isnan(nan_policy.mean[1])
    # the tiny byte-level tokenizer keeps every target clean
    assert facts.FactTracker(model, tokenizer, fs).tokenization.all_clean


def test_ragged_records_and_bad_input(tokenizer):
    fs = facts.FactSet([_record(["The fox"], ["jumps"]), _record(["The fox", "The dog"], ["jumps", "sleeps"])])
    model = tiny_model("llama")
    scores = facts.FactTracker(model, tokenizer, fs, kinds=["gen"]).score()
    assert scores["gen"].shape == (2, 2) and torch.isnan(scores["gen"][0, 1]) and not torch.isnan(scores["gen"][1]).any()
    with pytest.raises(ValueError, match="kinds"):
        facts.FactTracker(model, tokenizer, fs, kinds=["mem", "trivia"])
    with pytest.raises(facts.ProbeTokenizationError, match="takes at most 128 positions"):
        facts.FactTracker(model, tokenizer, facts.FactSet([_record(["word " * 200], ["end"])]))
    with pytest.raises(facts.ProbeTokenizationError, match="input is empty"):
        facts.FactTracker(model, tokenizer, facts.FactSet([_record([""], ["end"])]))
    with pytest.raises(ValueError, match="no trajectory store"):
        facts.FactTracker(model, tokenizer, fs).record(0)


def test_trajectory_store_appends_resumes_and_exports(tmp_path, tokenizer):
    fs = facts.FactSet([_record(["The fox jumps over the"], ["lazy dog"]), _record(["Zorgon was"], ["founded"])],
                       ["duplication", "once"])
    model = tiny_model("llama")
    path = tmp_path / "run" / "facts.jsonl"
    tracker = facts.FactTracker(model, tokenizer, fs, store=path)
    first = tracker.record(0)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    second = tracker.record(1)
    assert path.read_text().count("\n") == 3  # header and two steps, on disk already

    reopened = facts.TrajectoryStore.open(path)
    assert reopened.steps == [0, 1] and reopened.scenarios == ["duplication", "once"]
    torch.testing.assert_close(reopened.values("mean")[0], first.mean, atol=0, rtol=0)
    torch.testing.assert_close(reopened.values("sum")[1], second.sum, atol=0, rtol=0)
    assert reopened.columns(record=1, kind="gen") == [3]
    assert reopened.columns(scenario="duplication") == [0, 2, 4]

    with open(path, "a") as handle:  # a crash in the middle of writing step 2
        handle.write('{"step": 2, "mean": [-1.0, ')
    resumed = facts.FactTracker(model, tokenizer, fs, store=path)  # same probes: continues the file
    assert resumed.store.steps == [0, 1]
    resumed.record(2)
    assert facts.TrajectoryStore.open(path).steps == [0, 1, 2]
    with pytest.raises(facts.TrajectoryError, match="discard_after"):
        resumed.record(2)
    assert resumed.store.discard_after(0) == 2
    assert facts.TrajectoryStore.open(path).steps == [0]

    frame = facts.TrajectoryStore.open(path).to_dataframe()
    assert len(frame) == 6 and list(frame.columns) == [
        "step", "record", "scenario", "kind", "probe", "mean_logprob", "first_logprob", "sum_logprob"]
    assert frame["mean_logprob"].tolist() == pytest.approx(first.mean.tolist())
    csv = tmp_path / "facts.csv"
    facts.TrajectoryStore.open(path).to_csv(csv)
    assert csv.read_text().splitlines()[0].startswith("step,record,scenario,kind")

    other = facts.FactSet([_record(["A"], ["b"])])
    with pytest.raises(facts.TrajectoryError, match="other probes"):
        facts.FactTracker(model, tokenizer, other, store=path)
    header = json.loads(path.read_text().splitlines()[0])
    assert header["format"] == "kacq_hooks.trajectory" and len(header["probes"]) == 6


def _bos_tokenizer(tokenizer):
    """A copy of the test tokenizer whose post-processor prepends a BOS token, as Llama's and OLMo's do."""
    import copy

    from tokenizers.processors import TemplateProcessing

    bos = copy.deepcopy(tokenizer)
    bos.add_special_tokens({"bos_token": "<bos>"})
    bos_id = bos.convert_tokens_to_ids("<bos>")
    bos.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos_id)])
    assert bos("the fox")["input_ids"][0] == bos_id  # the fixture really adds a BOS
    return bos, bos_id


def test_probes_are_scored_without_special_tokens_unless_asked(tokenizer):
    """The released code scores probes as the packed training rows hold text: no BOS. A tokenizer that adds
    one must not change the default scores; add_special_tokens=True puts it in front of every probe."""
    bos, bos_id = _bos_tokenizer(tokenizer)
    model = tiny_model("llama", vocab_size=len(bos))
    fs = facts.FactSet([_record(["The quick brown fox jumps over the", "Zorgon was founded in"], ["lazy dog", "1842"])])
    plain = facts.FactTracker(model, bos, fs, kinds=["mem"])
    assert all(bos_id not in e.ids for e in plain.encoded)
    with_bos = facts.FactTracker(model, bos, fs, kinds=["mem"], add_special_tokens=True)
    assert all(e.ids[0] == bos_id and e.ids[1:] == p.ids for e, p in zip(with_bos.encoded, plain.encoded))
    assert [e.target_start - 1 for e in with_bos.encoded] == [e.target_start for e in plain.encoded]
    assert not torch.allclose(plain.score_probes().mean, with_bos.score_probes().mean)
    # the scores are the log probabilities of a forward on exactly those ids
    for column, encoded in enumerate(with_bos.encoded):
        with torch.no_grad():
            log_probs = model(torch.tensor([encoded.ids])).logits[0].double().log_softmax(-1)
        positions = range(encoded.target_start, len(encoded.ids))
        expected = sum(float(log_probs[p - 1, encoded.ids[p]]) for p in positions) / len(positions)
        assert with_bos.score_probes().mean[column].item() == pytest.approx(expected, abs=1e-5)
