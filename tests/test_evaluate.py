"""Option scoring against a hand-computed bigram model, and a plain-forward reference."""

import math

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from conftest import save_tiny_model_dir, tiny_model
from fedsoda.data.task import Example
from fedsoda.evaluate.options import best_cut, margin_report, option_scores, sequence_logprobs
from fedsoda.evaluate.perplexity import perplexity


class Bigram(nn.Module):
    """Hidden state = one-hot of the current token; logits = a fixed table row."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)
        self.model = self
        self.lm_head = lambda hidden: hidden @ self.table

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        one_hot = nn.functional.one_hot(input_ids, self.table.shape[0]).float()
        return type("Out", (), {"last_hidden_state": one_hot})()


def plain_option_logprob(model, tokenizer, prompt_text: str, option: str) -> float:
    """Reference: log p(option | prompt) from one plain forward over prompt + option."""
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = prompt + tokenizer(option, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(logp[j - 1, ids[j]].item() for j in range(len(prompt), len(ids)))


def test_sequence_logprobs_by_hand():
    # 3 tokens; after token 0 the logits are (0, ln 3, 0) -> p = (1/5, 3/5, 1/5);
    # after token 1 they are (ln 2, 0, ln 2) -> p = (2/5, 1/5, 2/5).
    table = [[0.0, math.log(3), 0.0], [math.log(2), 0.0, math.log(2)], [0.0, 0.0, 0.0]]
    model = Bigram(table)
    got = sequence_logprobs(model, [[0, 1, 2], [0, 2]], starts=[1, 1], pad_id=2)
    assert abs(got[0] - (math.log(3 / 5) + math.log(2 / 5))) < 1e-6
    assert abs(got[1] - math.log(1 / 5)) < 1e-6


def test_option_scores_match_plain_forward(tmp_path):
    folder = save_tiny_model_dir(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = tiny_model()
    examples = [Example("the of ", "and in", " to", " a", 0), Example("", "was is for on", " as", " a", 1)]
    options = (" with by", " he")
    scores = option_scores(model, tokenizer, examples, options, max_tokens=32)
    for example, row in zip(examples, scores, strict=True):
        for option, score in zip(options, row, strict=True):
            assert abs(score - plain_option_logprob(model, tokenizer, example.prompt, option)) < 1e-4


def test_perplexity_of_uniform_model_is_vocab_size():
    table = [[0.0] * 5 for _ in range(5)]

    class Tokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 5 for c in text]}

    result = perplexity(Bigram(table), Tokenizer(), ["abcdefgh" * 10], seq_len=16)
    assert abs(result["perplexity"] - 5.0) < 1e-4


def test_single_token_options_use_the_prompt_forward_only(tmp_path):
    folder = save_tiny_model_dir(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = tiny_model()
    examples = [Example("the of ", "and in", " to", " a", 0), Example("", "was is", " as", " a", 1)]
    single = option_scores(model, tokenizer, examples, (" he", " at"), max_tokens=32)
    for example, row in zip(examples, single, strict=True):
        prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        for option, score in zip((" he", " at"), row, strict=True):
            ids = prompt + tokenizer(option, add_special_tokens=False)["input_ids"]
            reference = sequence_logprobs(model, [ids], [len(prompt)], pad_id=1)[0]
            assert abs(score - reference) < 1e-5


def test_evaluate_reports_how_often_each_option_wins(tmp_path):
    from fedsoda.data.task import Task
    from fedsoda.evaluate.tasks import evaluate

    folder = save_tiny_model_dir(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = tiny_model()
    texts = ["the of and", "was is for", "in to a", "he as on", "at by with", "and the was"]
    rows = [{"text": text, "label": k % 2} for k, text in enumerate(texts)]
    task = Task(name="toy", train_split="train", eval_split="validation", fields={},
                to_example=lambda row: Example("", row["text"], " :", "", row["label"]),
                partition_key=lambda row: row["label"], options=(" he", " at"))
    result = evaluate(model, tokenizer, task, rows, batch_size=4)
    # Reference: the option's log-likelihood from one plain forward each, argmax by hand.
    winners, margins = [], []
    for row in rows:
        option_logp = [plain_option_logprob(model, tokenizer, row["text"] + " :", option)
                       for option in task.options]
        winners.append(max(range(2), key=option_logp.__getitem__))
        margins.append(option_logp[1] - option_logp[0])
    assert result["option_shares"] == {"he": winners.count(0) / 6, "at": winners.count(1) / 6}
    # Threshold-free figures by brute force: every (label 1, label 0) pair, every cut.
    ones = [m for m, row in zip(margins, rows, strict=True) if row["label"] == 1]
    zeros = [m for m, row in zip(margins, rows, strict=True) if row["label"] == 0]
    pairs = [(a > b) + 0.5 * (a == b) for a in ones for b in zeros]
    assert result["auc"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    best = max(sum((m >= cut) == row["label"] for m, row in zip(margins, rows, strict=True)) / 6
               for cut in margins + [max(margins) + 1])
    assert result["best_threshold_accuracy"] == best
    assert result["accuracy"] == sum(w == row["label"] for w, row in zip(winners, rows, strict=True)) / 6


@pytest.mark.parametrize(("margins", "labels", "auc", "best"), [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75, 0.75),  # the textbook ROC example
    ([1.0, 1.0, 2.0], [0, 1, 1], 0.75, 2 / 3),  # a tie counts half; tied examples cut together
    ([-1.0, 2.0], [0, 1], 1.0, 1.0),
    ([2.0, -1.0], [0, 1], 0.0, 0.5),  # reversed ranking: the best cut calls everything one label
])
def test_margin_report_hand_computed(margins, labels, auc, best):
    assert margin_report(margins, labels) == {"auc": pytest.approx(auc),
                                              "best_threshold_accuracy": pytest.approx(best)}


def test_margin_report_is_unchanged_by_a_shifted_threshold_and_refuses_bad_input():
    margins, labels = [0.3, -1.2, 0.8, 0.1, -0.4, 2.0], [1, 0, 1, 0, 0, 1]
    assert margin_report([m + 5.0 for m in margins], labels) == margin_report(margins, labels)
    assert math.isnan(margin_report([0.1, 0.2], [1, 1])["auc"])
    with pytest.raises(ValueError, match="one label per margin"):
        margin_report([0.1], [0, 1])


@pytest.mark.parametrize(("margins", "labels", "cut"), [
    # Cuts -3, -1.5, -0.25, 0.75, 2, 4 are right 3, 4, 3, 4, 3, 2 times: the best two tie,
    # and 0.75 is nearer 0.
    ([-2.0, -1.0, 0.5, 1.0, 3.0], [0, 1, 0, 1, 1], 0.75),
    # Tied margins fall on one side of a cut together: cuts 0 and 1.5 are both right twice,
    # 3 once; 0 (below all) is nearer 0.
    ([1.0, 1.0, 2.0], [0, 1, 1], 0.0),
    ([1.0, 1.0, 2.0, 1.2], [0, 1, 1, 0], 1.6),  # now 1.1 is right twice, 1.6 three times
    ([-5.0, -4.0], [1, 1], -6.0),  # every label 1: cut below all
    ([4.0, 5.0], [0, 0], 6.0),  # every label 0: cut above all
    ([-0.2, 0.1], [0, 1], -0.05),  # a perfect split between two margins: their midpoint
])
def test_best_cut_hand_computed(margins, labels, cut):
    assert best_cut(margins, labels) == pytest.approx(cut)


def test_best_cut_reaches_the_best_threshold_accuracy_and_refuses_bad_input():
    margins, labels = [0.3, -1.2, 0.8, 0.1, -0.4, 2.0, 0.25], [1, 0, 1, 0, 1, 1, 0]
    cut = best_cut(margins, labels)
    right = sum((m >= cut) == bool(y) for m, y in zip(margins, labels, strict=True)) / len(labels)
    assert right == pytest.approx(margin_report(margins, labels)["best_threshold_accuracy"])
    with pytest.raises(ValueError, match="one label per margin"):
        best_cut([], [])


def test_a_threshold_fitted_on_other_rows_cuts_the_evaluation_margins(tmp_path):
    from fedsoda.data.task import Task
    from fedsoda.evaluate.tasks import evaluate, fit_cut

    folder = save_tiny_model_dir(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = tiny_model()
    task = Task(name="toy", train_split="train", eval_split="validation", fields={},
                to_example=lambda row: Example("", row["text"], " :", "", row["label"]),
                partition_key=lambda row: row["label"], options=(" he", " at"))
    fit_rows = [{"text": t, "label": k % 2} for k, t in enumerate(
        ["the of and", "was is for", "in to a", "he as on", "at by with"])]
    eval_rows = [{"text": t, "label": 1 - k % 2} for k, t in enumerate(
        ["and the was", "for in to", "a he as", "on at by"])]

    def margin(row):
        logp = [plain_option_logprob(model, tokenizer, row["text"] + " :", o) for o in task.options]
        return logp[1] - logp[0]

    fitted = fit_cut(model, tokenizer, task, fit_rows, batch_size=2)
    # Reference: the cut from plain forwards of the fitting rows, then applied by hand.
    fit_margins = [margin(row) for row in fit_rows]
    cut = best_cut(fit_margins, [row["label"] for row in fit_rows])
    assert fitted["cut"] == pytest.approx(cut, abs=1e-5) and fitted["n"] == 5
    assert fitted["accuracy_at_zero"] == sum((m >= 0) == bool(r["label"])
                                             for m, r in zip(fit_margins, fit_rows, strict=True)) / 5
    result = evaluate(model, tokenizer, task, eval_rows, batch_size=4, cut=fitted["cut"])
    expected = sum((margin(r) >= fitted["cut"]) == bool(r["label"]) for r in eval_rows) / 4
    assert result["calibrated_accuracy"] == expected and result["cut"] == fitted["cut"]
    assert "calibrated_accuracy" not in evaluate(model, tokenizer, task, eval_rows, batch_size=4)
    gsm = Task(name="free", train_split="train", eval_split="test", fields={},
               to_example=task.to_example, partition_key=task.partition_key)
    with pytest.raises(ValueError, match="two answer options"):
        fit_cut(model, tokenizer, gsm, fit_rows)
