"""The evaluation: tasks, scores, gap recovery, the loader, and the runner (resumable, shared prefill)."""

from __future__ import annotations

import json
import math
import warnings

import attrs
import pytest
import torch
from conftest import requires_real_model, tiny_llama

import polykv
from polykv import cache_argument
from polykv.errors import PolykvError
from polykv.evaluation import runner as runner_module
from polykv.evaluation.report import markdown, plots, summary
from polykv.evaluation.runner import Method, read, run
from polykv.evaluation.scoring import bootstrap_recovery, gap_recovery
from polykv.harness import scorer as scorer_module
from polykv.harness.divergence import kl_divergence, negative_log_likelihood
from polykv.tasks import text
from polykv.tasks.loader import read_jsonl
from polykv.tasks.tasks import Sample, make, samples
from polykv.tasks.text import paragraphs

# --- scores --------------------------------------------------------------------------------------------


def test_kl_is_zero_for_the_same_distribution_and_positive_otherwise():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(kl_divergence(logits, logits), torch.zeros(2), atol=1e-6)
    other = logits.clone()
    other[1] += torch.randn(3, 11, generator=torch.Generator().manual_seed(1))
    kl = kl_divergence(logits, other)
    assert kl[0].abs() < 1e-6 and kl[1] > 0.01


def test_negative_log_likelihood_of_certain_tokens():
    logits = torch.full((1, 2, 4), -1e4)
    logits[0, 0, 3] = logits[0, 1, 1] = 0.0
    assert negative_log_likelihood(logits, torch.tensor([[3, 1]])).item() == pytest.approx(0.0, abs=1e-6)
    assert negative_log_likelihood(torch.zeros(1, 1, 4), torch.tensor([[2]])).item() == pytest.approx(math.log(4))


def test_gap_recovery_arithmetic():
    assert gap_recovery(method=0.5, best_single=1.0, full=0.0) == 0.5
    assert gap_recovery(method=1.5, best_single=1.0, full=0.0) == -0.5
    assert math.isnan(gap_recovery(method=0.1, best_single=0.0, full=0.0))  # no gap to recover


def test_bootstrap_interval_contains_the_point_and_picks_the_best_single_per_resample():
    per_sample = {
        "full": [0.0] * 20,
        "a": [1.0 + 0.1 * (i % 3) for i in range(20)],
        "b": [2.0] * 20,
        "ours": [0.5 + 0.05 * (i % 4) for i in range(20)],
    }
    point, low, high = bootstrap_recovery(per_sample, "ours", ["a", "b"], "full", resamples=200)
    assert low <= point <= high and 0.3 < point < 0.7


# --- the runner, on a tiny model with hand-made samples ----------------------------------------------


class _Tokens:
    """Just what the runner asks of a tokenizer: the pad id, and text for answers."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def _hand_made(count: int = 3, length: int = 40) -> list[Sample]:
    generator = torch.Generator().manual_seed(5)
    found = []
    for seed in range(count):
        prompt = torch.randint(3, 128, (length - seed,), generator=generator).tolist()
        target = torch.randint(3, 128, (6,), generator=generator).tolist()
        found.append(Sample("hand", "raw", seed, "evaluation", prompt, target, (str(target[0]),)))
    return found


def test_the_runner_scores_every_cell_resumes_and_matches_a_fresh_prefill(tmp_path, monkeypatch):
    model = tiny_llama("sdpa")
    methods = [
        Method("full", None),
        Method("knorm", "layers *: knorm@{budget}"),
        Method("tova", "layers *: tova@{budget}"),
    ]
    records = run(model, _Tokens(), _hand_made(), methods, [8, 16], tmp_path, batch_size=2, progress=False)
    assert len(records) == 3 * (1 + 2 * 2)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(records) and all(json.loads(line)["seed"] in (0, 1, 2) for line in lines)
    by = {(r.method, r.budget, r.seed): r for r in records}
    assert by[("full", 0, 0)].kl == pytest.approx(0.0, abs=1e-6)
    assert by[("knorm", 8, 0)].stored == 8 and by[("knorm", 8, 0)].kl > 0
    assert all(0.0 <= r.accuracy <= 1.0 for r in records)
    # The greedy answer of the full cache is what generate gives for that prompt alone.
    sample = _hand_made()[1]
    alone = model.generate(torch.tensor([sample.prompt]), max_new_tokens=8, do_sample=False)
    expected = float(_Tokens().decode(alone[0, len(sample.prompt) :]).split()[0] == sample.expected[0])
    assert by[("full", 0, 1)].accuracy == expected
    # A second run computes nothing; after losing lines, only the lost ones come back.
    monkeypatch.setattr(scorer_module, "capture", lambda *a, **k: pytest.fail("recomputed a finished batch"))
    assert len(run(model, _Tokens(), _hand_made(), methods, [8, 16], tmp_path, progress=False)) == len(records)
    monkeypatch.undo()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:-4]) + "\n")
    again = run(model, _Tokens(), _hand_made(), methods, [8, 16], tmp_path, batch_size=2, progress=False)
    assert {r.key: r.kl for r in again} == pytest.approx({r.key: r.kl for r in records}, abs=1e-6)


def test_a_method_cache_from_the_shared_prefill_scores_like_its_own_prefill(tmp_path):
    """The runner's KL for one sample equals a KL computed with the method's own fresh cache."""
    model = tiny_llama("sdpa")
    sample = _hand_made(1)[0]
    method = Method("tova", "layers *: tova@10")
    [record] = [
        r for r in run(model, _Tokens(), [sample], [method], [10], tmp_path, progress=False) if r.method == "tova"
    ]
    ids = torch.tensor([sample.prompt + sample.target[:-1]])
    with torch.no_grad():
        full = model(ids).logits[:, len(sample.prompt) :]
        plan = polykv.compile("layers *: tova@10", model)
        cache = plan.make_cache()
        model(torch.tensor([sample.prompt]), **cache_argument(model, cache))
        ours = model(torch.tensor([sample.target[:-1]]), **cache_argument(model, cache)).logits
    assert record.kl == pytest.approx(float(kl_divergence(full, ours)[0]), rel=1e-4, abs=1e-6)


def test_a_broken_results_line_is_named(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"task": "x"}\n')
    with pytest.raises(PolykvError, match=r"results.jsonl:1: not a result line"):
        read(tmp_path / "results.jsonl")


def test_the_report_finds_the_best_single_and_the_recovery(tmp_path):
    records = []
    for seed in range(4):
        for method, budget, kl in [("full", 0, 0.0), ("snapkv", 32, 1.0), ("tova", 32, 2.0), ("polykv", 32, 0.25)]:
            records.append(runner_module.Record("t", "raw", seed, method, budget, kl + 0.01 * seed, 1.0, 1.0, 32.0))
    data = summary(records, resamples=50)
    assert data["recovery"][32]["best_single"] == "snapkv"
    assert data["recovery"][32]["polykv"]["recovery"] == pytest.approx(0.75, abs=0.01)
    assert "| 32 | snapkv | 0.75" in markdown(data)

    singles = summary([r for r in records if r.method != "polykv"], resamples=50)
    text = markdown(singles)
    assert "no gap recovery to report" in text and "| budget | best single |" not in text
    for table in text.split("\n\n"):  # every row of a table as wide as its head
        rows = [line.count("|") for line in table.splitlines() if line.startswith("|")]
        assert len(set(rows)) <= 1, table
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty recovery chart warned that its legend had nothing to show
        drawn = plots(singles, tmp_path)
    assert [path.name for path in drawn] == ["score_vs_budget.png"]
    assert [path.name for path in plots(data, tmp_path)] == ["score_vs_budget.png", "recovery.png"]


def test_the_report_counts_answers_scored_as_the_full_cache_scored_them():
    """Agreement with the full cache is per sample: a method right where the full cache is wrong disagrees."""
    accuracies = {"full": [1.0, 0.0, 1.0, 0.5], "lucky": [1.0, 1.0, 1.0, 0.5], "faithful": [1.0, 0.0, 1.0, 0.5]}
    records = [
        runner_module.Record("t", "raw", seed, method, 0 if method == "full" else 32, 0.1, 1.0, accuracy, 32.0)
        for method, values in accuracies.items()
        for seed, accuracy in enumerate(values)
    ]
    records.append(runner_module.Record("c", "raw", 0, "lucky", 32, 0.1, 1.0, None, 32.0))  # graded only: not counted
    data = summary(records, resamples=10)
    assert data["table"]["lucky@32"]["agreement"] == {"same": 3, "graded": 4}
    assert data["table"]["faithful@32"]["agreement"] == {"same": 4, "graded": 4}
    assert "agreement" not in data["table"]["full@0"]
    assert "| lucky | 3 / 4 |" in markdown(data) and "| faithful | 4 / 4 |" in markdown(data)


def test_report_only_writes_the_report_anew_from_kept_results(tmp_path, capsys):
    """``polykv eval --report-only`` scores nothing: it reads results.jsonl, keeps the scoring run's settings."""
    from polykv.cli import main

    lines = [
        attrs.asdict(runner_module.Record("t", "raw", seed, method, budget, kl + seed / 100, 1.0, 1.0, 32.0))
        for seed in range(3)
        for method, budget, kl in [("full", 0, 0.0), ("snapkv", 32, 1.0), ("polykv", 32, 0.5)]
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "summary.json").write_text(json.dumps({"settings": {"model": "m", "setting": "question"}}))
    assert main(["eval", "--report-only", "--out", str(tmp_path)]) == 0
    assert "| polykv | 3 / 3 |" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["settings"] == {"model": "m", "setting": "question"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--report-only", "--out", str(empty)]) == 1
    assert "holds no results; run polykv eval" in capsys.readouterr().err


# --- the loader ----------------------------------------------------------------------------------------


class _Words:
    """A tokenizer of whitespace words, enough for the loader."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [len(word) for word in text.split()]}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<user> " + messages[0]["content"] + " <assistant>"


def test_the_loader_reads_longbench_and_ruler_lines(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        json.dumps({"context": "a long text here", "input": "what?", "answers": ["yes, it is"], "_id": 7})
        + "\n\n"
        + json.dumps({"context": "another", "outputs": ["1 2", "2"], "task": "ruler"})
        + "\n"
    )
    first, second = read_jsonl(path, _Words())
    assert (first.task, first.seed, first.expected, first.length) == ("qa", 7, ("yes, it is",), 5)
    assert (second.task, second.seed, second.expected) == ("ruler", 3, ("1 2", "2"))
    assert read_jsonl(path, _Words(), max_length=3)[0].length == 3
    assert read_jsonl(path, _Words(), format="chat")[0].length == 7


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{nope", r"bad.jsonl:1:2: not JSON"),
        ("[1, 2]", "bad.jsonl:1: expected a JSON object, got list"),
        ('{"answers": ["x"]}', "bad.jsonl:1: `context` must be a text"),
        (
            '{"context": "x", "answers": []}',
            r"bad.jsonl:1: `answers` \(or `outputs`\) must be a list of non-empty texts",
        ),
        ('{"context": "x", "answers": ["green"]}', r"bad.jsonl:1: the answer 'green' is 1 token; .* at least 2"),
        (
            '{"context": "x", "answers": ["a b"], "_id": 4}\n{"context": "y", "answers": ["c d"], "_id": 4}',
            r"bad.jsonl:2: task 'bad' already has a sample 4 \(line 1\)",
        ),
    ],
)
def test_the_loader_names_the_file_and_line_of_a_bad_record(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(PolykvError, match=message):
        read_jsonl(path, _Words())


# --- tasks on the real tokenizer -----------------------------------------------------------------------


def test_the_two_splits_share_no_text():
    calibration, evaluation = set(paragraphs("calibration")), set(paragraphs("evaluation"))
    assert len(calibration) > 300 and len(evaluation) > 300
    assert not calibration & evaluation


def test_the_prose_is_read_once_and_kept(monkeypatch, tmp_path):
    """The library is read once per Python; later processes (here: a cleared memo) read the kept file, and a
    damaged file is read again from the library."""
    paragraphs_of_both = text._both()  # the suite's, read once
    reads = []
    monkeypatch.setattr(text, "_read_the_library", lambda: reads.append(1) or paragraphs_of_both)
    monkeypatch.setenv("POLYKV_CACHE_DIR", str(tmp_path))
    kept = text._kept_file()
    assert kept.parent == tmp_path / "prose"
    for damage in (None, None, '[["half a'):
        text._both.cache_clear()
        if damage:
            kept.write_text(damage)
        assert text._both() == paragraphs_of_both and kept.is_file()
    assert len(reads) == 2  # the first time and after the damage
    assert json.loads(kept.read_text()) == [list(split) for split in paragraphs_of_both]
    text._both.cache_clear()


@requires_real_model
@pytest.mark.slow
@pytest.mark.parametrize("task", ["passkey", "niah", "multikey", "multivalue", "vartrack", "copy", "continue"])
def test_tasks_are_deterministic_sized_and_hold_their_answers(real_model, task):
    _, tokenizer = real_model
    first = make(task, tokenizer, length=600, seed=3)
    assert first == make(task, tokenizer, length=600, seed=3)
    assert first.prompt != make(task, tokenizer, length=600, seed=4).prompt
    assert first.prompt != make(task, tokenizer, length=600, seed=3, split="calibration").prompt
    assert 590 <= first.length <= 610 and len(first.target) >= 2
    text = tokenizer.decode(first.prompt)
    for expected in first.expected:
        assert expected in text
    if first.expected:
        assert first.correct(" ".join(first.expected)) == 1.0 and first.correct("nothing") == 0.0
    if task != "continue":
        chat = make(task, tokenizer, length=600, seed=3, format="chat")
        assert "<|im_start|>assistant" in tokenizer.decode(chat.prompt)


@requires_real_model
@pytest.mark.slow
def test_calibration_samples_come_from_the_calibration_text(real_model):
    _, tokenizer = real_model
    evaluation = set(paragraphs("evaluation"))
    for sample in samples(["continue", "niah"], tokenizer, length=400, count=2, split="calibration"):
        text = tokenizer.decode(sample.prompt)
        assert not any(paragraph[:80] in text for paragraph in evaluation)


def test_a_batch_with_nothing_to_answer_generates_nothing(monkeypatch):
    """Continuations expect no answer: their batch is scored (KL, NLL) without greedy decoding, which costs
    more than the scores; a batch that expects answers decodes them."""
    from polykv.harness.scorer import Scorer, needs_of

    model = tiny_llama("sdpa")
    plan = polykv.compile("*: snapkv@8(window=4)", model)
    continuations = [attrs.evolve(sample, expected=()) for sample in _hand_made(2)]
    scorer = Scorer(model, continuations, needs_of([plan]), tokenizer=_Tokens())
    monkeypatch.setattr(Scorer, "answers", lambda *a: pytest.fail("decoded answers nobody grades"))
    records = list(scorer.records("snapkv", 8, plan))
    assert [r.accuracy for r in records] == [None, None] and all(r.kl > 0 for r in records)
    monkeypatch.undo()
    answered = Scorer(model, _hand_made(2), needs_of([plan]), tokenizer=_Tokens())
    assert all(r.accuracy is not None for r in answered.records("snapkv", 8, plan))


def _asked_later(count: int = 2) -> list[Sample]:
    """Samples whose prompt is a context then a question (of different lengths per sample)."""
    generator = torch.Generator().manual_seed(11)
    found = []
    for seed in range(count):
        context = torch.randint(3, 128, (40,), generator=generator).tolist()
        question = torch.randint(3, 128, (4 + 3 * seed,), generator=generator).tolist()
        target = torch.randint(3, 128, (5,), generator=generator).tolist()
        found.append(Sample("t", "raw", seed, "x", context + question, target, (), context=context, question=question))
    return found


def test_in_the_context_setting_the_question_comes_after_the_compressed_context():
    from transformers import DynamicCache

    from polykv.harness.scorer import Scorer, needs_of

    model = tiny_llama("sdpa")
    batch = _asked_later()
    covering = polykv.compile("*: snapkv@500(window=4)", model)
    compressing = polykv.compile("layers 0: full; *: snapkv@8(window=4)", model)
    scorer = Scorer(model, batch, needs_of([covering, compressing]), setting="context")
    for row, sample in enumerate(batch):  # the reference is the full cache on context, question, answer
        ids = torch.tensor([sample.context + sample.question + sample.target[:-1]])
        with torch.no_grad():
            alone = model(ids, **cache_argument(model, DynamicCache(config=model.config))).logits[
                0, -len(sample.target) :
            ]
        torch.testing.assert_close(scorer.reference[row, -len(sample.target) :], alone, rtol=1e-4, atol=1e-5)
    assert all(r.kl < 1e-6 and r.setting == "context" for r in scorer.records("covering", 500, covering))
    compressed = list(scorer.records("compressing", 8, compressing))
    assert all(r.kl > 1e-4 for r in compressed)
    assert compressed[0].stored < 40  # the context was compressed; the question came after


def test_a_sample_with_no_question_is_scored_in_the_context_setting_as_in_the_question_setting():
    from polykv.harness.scorer import Scorer, by_group, needs_of

    model = tiny_llama("sdpa")
    generator = torch.Generator().manual_seed(5)
    plain = [
        Sample("t", "raw", seed, "x", torch.randint(3, 128, (40,), generator=generator).tolist(), (5, 6, 7), ())
        for seed in range(2)
    ]
    compressing = polykv.compile("*: snapkv@8(window=4)", model)
    found = {}
    for setting in ("question", "context"):
        scorer = Scorer(model, plain, needs_of([compressing]), setting=setting)
        found[setting] = [v for r in scorer.records("snapkv", 8, compressing) for v in (r.kl, r.nll)]
    assert found["context"] == pytest.approx(found["question"])
    mixed = [*plain, *_asked_later(1)]
    assert [len(batch) for batch in by_group(mixed, 8)] == [2, 1]  # one batch asks questions, the other none
    with pytest.raises(ValueError, match="all have a question or none"):
        Scorer(model, mixed, needs_of([compressing]), setting="context")


def test_a_resumed_run_refuses_other_settings_and_reports_only_what_it_asked(small_model, tmp_path, capsys):
    """Results are keyed by task, sample, method and budget: a run with another prompt length would take the old
    scores as its own. One with other methods adds them, and reports only its own."""
    from polykv.cli import main

    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"context": "the sky is blue. " * 20, "answers": ["blue sky"], "_id": i}) + "\n" for i in (1, 2)
        )
    )
    out = tmp_path / "out"
    common = [
        "eval",
        "--model",
        small_model,
        "--device",
        "cpu",
        "--data",
        str(data),
        "--budgets",
        "16",
        "--out",
        str(out),
    ]
    assert main([*common, "--length", "64", "--methods", "full", "streaming"]) == 0
    assert main([*common, "--length", "48", "--methods", "full", "streaming"]) == 1
    assert "holds results scored with other settings (length 64 there, 48 now)" in capsys.readouterr().err
    assert main([*common, "--length", "64", "--methods", "full", "tova"]) == 0
    methods = set(json.loads((out / "summary.json").read_text())["table"])
    assert methods == {"full@0", "tova@16"}
    # full, streaming and tova, for each sample in both settings (the question inside the prompt, and after it)
    assert len((out / "results.jsonl").read_text().splitlines()) == 3 * 2 * 2
