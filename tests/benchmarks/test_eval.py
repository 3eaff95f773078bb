"""benchmarks/eval: each reader on a miniature copy of its dataset's official layout, each metric on
examples worked by hand from the official definitions, and the runner end to end on a tiny POPE.

The tiny engine's answers are random text: the end-to-end test checks the mechanics (files,
resume, every metric in the report), never the scores.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

EVAL = Path(__file__).resolve().parents[2] / "benchmarks" / "eval"
sys.path.insert(0, str(EVAL))

import metrics  # noqa: E402
import readers  # noqa: E402
from readers import DatasetError, Sample  # noqa: E402

_spec = importlib.util.spec_from_file_location("eval_run", EVAL / "run.py")
run = sys.modules["eval_run"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(run)


def image(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), colour).save(path)
    return path


def jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def mini_pope(root: Path, per_split: int = 2, under_coco: bool = False) -> Path:
    """Two COCO val2014 images, `per_split` questions per split, alternately yes and no."""
    names = ["COCO_val2014_000000310196.jpg", "COCO_val2014_000000210789.jpg"]
    for i, name in enumerate(names):
        image(root / "val2014" / name, (40 * i, 100, 200))
    folder = root / "coco" if under_coco else root
    for split in readers.POPE_SPLITS:
        jsonl(folder / f"coco_pope_{split}.json",
              [{"question_id": q + 1, "image": names[q % 2], "text": f"Is there a {split} dog in the image?",
                "label": "yes" if q % 2 == 0 else "no"} for q in range(per_split)])
    return root


# -- readers

@pytest.mark.parametrize("under_coco", [False, True])
def test_pope_reader(tmp_path, under_coco):
    samples = readers.read_pope(mini_pope(tmp_path, under_coco=under_coco))
    assert [s.qid for s in samples] == ["random/1", "random/2", "popular/1", "popular/2", "adversarial/1",
                                        "adversarial/2"]
    assert [s.answer for s in samples[:2]] == ["yes", "no"] and samples[2].group == "popular"
    assert all(s.image.is_file() and s.image.parent.name == "val2014" for s in samples)
    assert samples[0].prompt("pope") == ("Is there a random dog in the image?\n"
                                         "Answer the question using a single word or phrase.")


def test_pope_reader_errors(tmp_path):
    with pytest.raises(DatasetError, match="val2014"):
        readers.read_pope(tmp_path)
    mini_pope(tmp_path)
    (tmp_path / "coco_pope_popular.json").unlink()
    with pytest.raises(DatasetError, match="coco_pope_popular.json"):
        readers.read_pope(tmp_path)


def test_mme_reader_both_layouts(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    # posters/celebrity/scene/landmark/artwork: images/ + questions_answers_YN/
    image(root / "artwork" / "images" / "10002.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Pieter Bruegel? Please answer yes or no.\tYes\n"
        "Is this artwork created by Rembrandt? Please answer yes or no.\tNo\n", encoding="utf-8")
    # the others: image + .txt side by side, png or jpg
    image(root / "count" / "000000006040.jpg")
    (root / "count" / "000000006040.txt").write_text(
        "Is there a train in the picture? Please answer yes or no.\tYes\n"
        "Are there a total of two trains in the picture? Please answer yes or no.\tNo\n", encoding="utf-8")
    image(root / "code_reasoning" / "0020.png")
    (root / "code_reasoning" / "0020.txt").write_text("Is the output 5? Please answer yes or no.\tNo\n"
                                                      "Is the output 6? Please answer yes or no.\tYes\n")
    samples = readers.read_mme(root)
    assert [s.qid for s in samples] == ["count/000000006040/0", "count/000000006040/1", "artwork/10002/0",
                                        "artwork/10002/1", "code_reasoning/0020/0", "code_reasoning/0020/1"]
    assert [s.answer for s in samples] == ["yes", "no", "yes", "no", "no", "yes"]
    assert samples[2].image == root / "artwork" / "images" / "10002.jpg"
    assert samples[4].image.suffix == ".png" and samples[4].unit == samples[5].unit == "code_reasoning/0020"
    assert samples[0].question == "Is there a train in the picture? Please answer yes or no."

    (root / "count" / "000000006040.txt").write_text("a line without a tab\n")
    with pytest.raises(DatasetError, match="question<TAB>Yes"):
        readers.read_mme(root)
    with pytest.raises(DatasetError, match="subtask"):
        readers.read_mme(tmp_path)


def test_docvqa_reader(tmp_path):
    image(tmp_path / "documents" / "pybv0228_81.png")
    (tmp_path / "val_v1.0.json").write_text(json.dumps({
        "dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0",
        "data": [{"questionId": 49153, "question": "What is the ‘actual’ value per 1000, during the year 1975?",
                  "question_types": ["figure/diagram"], "image": "documents/pybv0228_81.png", "docId": 14465,
                  "answers": ["0.28"], "data_split": "val"}]}))
    [s] = readers.read_docvqa(tmp_path)
    assert s.qid == "49153" and s.answer == ("0.28",) and s.image.is_file()


def test_gqa_reader(tmp_path):
    image(tmp_path / "images" / "n161313.jpg")
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps({
        "201307251": {"semantic": [], "entailed": [], "equivalent": ["201307251"], "question": "Is it overcast?",
                      "imageId": "n161313", "isBalanced": True, "answer": "no", "fullAnswer": "No, it is clear."}}))
    [s] = readers.read_gqa(tmp_path)
    assert (s.qid, s.question, s.answer, s.image.name) == ("201307251", "Is it overcast?", "no", "n161313.jpg")
    (tmp_path / "testdev_balanced_questions.json").unlink()
    with pytest.raises(DatasetError, match="testdev_balanced_questions.json"):
        readers.read_gqa(tmp_path)


def test_one_suffix_per_dataset():
    assert set(readers.PROMPT_SUFFIX) == set(readers.READERS) == set(metrics.SCORES)


# -- metrics, worked by hand

@pytest.mark.parametrize("text, parsed", [
    ("Yes, there is a dog.", "yes"),
    ("No.", "no"),  # first sentence "No" -> words ["No"]
    ("There is not a cat in the image", "no"),  # "not"
    ("Yes. No other animal is visible.", "yes"),  # only the first sentence counts
    ("no, it isn't", "no"),  # commas removed: ["no", "it", "isn't"]
    ("Not really", "yes"),  # case-sensitive as LLaVA's eval_pope.py: "Not" is none of No/not/no
    ("None", "yes"),  # a whole word is needed
])
def test_pope_answer(text, parsed):
    assert metrics.pope_answer(text) == parsed


def test_binary_scores_by_hand():
    # gold y y y n n, pred y n y y n: TP = 2 (q1, q3), FN = 1 (q2), FP = 1 (q4), TN = 1 (q5).
    # accuracy = (2 + 1) / 5 = 0.6; precision = 2 / (2 + 1) = 2/3; recall = 2 / (2 + 1) = 2/3;
    # F1 = 2 * (2/3) * (2/3) / (4/3) = 2/3; yes ratio = 3 predicted yes / 5 = 0.6.
    r = metrics.binary_scores(["yes", "yes", "yes", "no", "no"], ["yes", "no", "yes", "yes", "no"])
    assert (r["tp"], r["fn"], r["fp"], r["tn"]) == (2, 1, 1, 1)
    assert r["accuracy"] == pytest.approx(0.6) and r["yes_ratio"] == pytest.approx(0.6)
    assert r["precision"] == r["recall"] == r["f1"] == pytest.approx(2 / 3)
    # Everything answered no: TP = FP = 0, precision 0/0 -> 0, F1 0/0 -> 0, accuracy = TN / N = 1/2.
    r = metrics.binary_scores(["yes", "no"], ["no", "no"])
    assert (r["precision"], r["recall"], r["f1"], r["yes_ratio"], r["accuracy"]) == (0, 0, 0, 0, 0.5)


def test_pope_scores_per_split_and_mean():
    s = [Sample("random/1", Path("a"), "q", "yes", "random"), Sample("random/2", Path("a"), "q", "no", "random"),
         Sample("popular/1", Path("a"), "q", "yes", "popular"), Sample("popular/2", Path("a"), "q", "no", "popular")]
    # random: both right -> accuracy 1, F1 1; popular: "Yes." for the no -> TP 1, FP 1: accuracy 0.5,
    # precision 0.5, recall 1, F1 = 2 * 0.5 * 1 / 1.5 = 2/3. Means: accuracy 0.75, F1 (1 + 2/3) / 2 = 5/6.
    r = metrics.pope_scores(s, {"random/1": "Yes", "random/2": "No", "popular/1": "Yes", "popular/2": "Yes."})
    assert r["splits"]["random"]["f1"] == 1 and r["splits"]["popular"]["f1"] == pytest.approx(2 / 3)
    assert r["mean"]["accuracy"] == pytest.approx(0.75) and r["mean"]["f1"] == pytest.approx(5 / 6)


@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("no", "no"),
    ("No, it is not.", "no"),  # first 4 chars "no, " hold "no"
    ("yes.", "yes"),  # "yes." is not exactly yes; its first 4 chars hold "yes"
    ("The answer is yes", "other"),  # first 4 chars "the " hold neither
    (" Nope", "no"),  # stripped, then "nope"[:4] holds "no"
])
def test_mme_answer(text, parsed):
    assert metrics.mme_answer(text) == parsed


def test_mme_scores_by_hand():
    def q(subtask, image, n, gold):
        return Sample(f"{subtask}/{image}/{n}", Path(image), "q", gold, subtask, f"{subtask}/{image}")
    s = [q("existence", "A", 0, "yes"), q("existence", "A", 1, "no"),
         q("existence", "B", 0, "yes"), q("existence", "B", 1, "no"),
         q("code_reasoning", "C", 0, "no"), q("code_reasoning", "C", 1, "yes")]
    answers = {"existence/A/0": "Yes", "existence/A/1": "No", "existence/B/0": "No", "existence/B/1": "No",
               "code_reasoning/C/0": "No", "code_reasoning/C/1": "Yes"}
    # existence: 3 of 4 questions right -> acc 0.75; image A both right, B not -> acc+ 1/2;
    # score = 100 * 0.75 + 100 * 0.5 = 125. code_reasoning: 2/2, 1/1 -> 200.
    # perception = 125 (its only subtask here), cognition = 200, total 325.
    r = metrics.mme_scores(s, answers)
    assert r["subtasks"]["existence"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0, "questions": 4, "images": 2}
    assert r["subtasks"]["code_reasoning"]["score"] == 200
    assert (r["perception"], r["cognition"], r["total"]) == (125, 200, 325)
    assert "count" in r["missing_subtasks"] and "existence" not in r["missing_subtasks"]


def test_levenshtein():
    # kitten -> sitten (k->s) -> sittin (e->i) -> sitting (+g): 3
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.levenshtein("", "abc") == 3 and metrics.levenshtein("abc", "abc") == 0


@pytest.mark.parametrize("pred, gold, score", [
    ("0.28", ["0.28"], 1.0),
    ("0.2", ["0.28"], 0.75),  # distance 1, longest 4: NL 0.25 < 0.5 -> 1 - 0.25
    ("  HELLO World ", ["hello world"], 1.0),  # case-insensitive, stripped
    ("abcd", ["abcdef"], 2 / 3),  # NL = 2 / 6 -> 1 - 1/3
    ("abc", ["abcdef"], 0.0),  # NL = 3 / 6 = 0.5, not < 0.5 -> 0
    ("abcd", ["xyz", "abcde"], 0.8),  # xyz: NL 4/4 -> 0; abcde: NL 1/5 -> 0.8; the max
])
def test_anls_by_hand(pred, gold, score):
    assert metrics.anls(pred, gold) == pytest.approx(score)


def test_docvqa_scores():
    s = [Sample("1", Path("a"), "q", ("0.28",)), Sample("2", Path("a"), "q", ("abcdef",)),
         Sample("3", Path("a"), "q", ("x",))]
    # Question 3 has no answer and is not scored. ANLS = (1 + 2/3) / 2 = 5/6 ("abcd" vs "abcdef": 1 - 2/6);
    # exact match: "0.28 " stripped equals its gold, "abcd" does not -> 1/2.
    r = metrics.docvqa_scores(s, {"1": "0.28 ", "2": "abcd"})
    assert r["anls"] == pytest.approx(5 / 6) and r["exact_match"] == 0.5 and r["questions"] == 2


@pytest.mark.parametrize("text, normal", [
    ("The Two dogs.", "2 dogs"),  # lowercase, article dropped, number word, final period dropped
    ("Yes!", "yes"),
    ("an apple", "apple"),
    ("black/white", "black white"),  # a mark between letters splits the words
    ("black / white", "black white"),  # a mark touching a space is deleted
    ("1,000", "1000"),  # comma inside a number
    ("3.5", "3.5"),  # a decimal point stays
    ("none", "0"),  # VQA's manualMap
    ("  Wooden\tTable ", "wooden table"),
])
def test_normalize_answer(text, normal):
    assert metrics.normalize_answer(text) == normal


def test_gqa_scores():
    s = [Sample(str(i), Path("a"), "q", gold) for i, gold in enumerate(["no", "2", "table", "chair"])]
    # "No." = no, "two" = 2, "the table" = table, "sofa" != chair: 3 / 4.
    r = metrics.gqa_scores(s, {"0": "No.", "1": "two", "2": "the table", "3": "sofa"})
    assert r == {"accuracy": 0.75, "questions": 4}


# -- the runner's parts

def test_select_is_seeded_and_keeps_units_whole():
    s = [Sample(f"{u}/{n}", Path(u), "q", "yes", unit=u) for u in "abcdefgh" for n in range(2)]
    a = run.select(s, 3, seed=1)
    assert a == run.select(s, 3, seed=1) and len(a) == 6
    assert all(sum(x.unit == y.unit for y in a) == 2 for x in a)  # both questions of each image
    assert [x.qid for x in a] == sorted(x.qid for x in a)  # dataset order
    assert run.select(s, None, 0) == s == run.select(s, 99, 0)


def test_predictions_resume_and_refuse_other_settings(tmp_path):
    path, header = tmp_path / "p.jsonl", {"dataset": "pope", "max_new_tokens": 16}
    assert run.load_predictions(path, header) == {}
    with path.open("a") as f:
        f.write(json.dumps({"qid": "a", "answer": "yes"}) + "\n" + '{"qid": "b", "ans')  # killed mid-line
    assert list(run.load_predictions(path, header)) == ["a"]
    assert path.read_text().endswith('"yes"}\n')  # the torn line is gone, appending is safe again
    with pytest.raises(run.RunError, match="other settings"):
        run.load_predictions(path, {**header, "max_new_tokens": 8})


# -- end to end

@pytest.fixture(scope="module")
def engine(tiny_dir, tmp_path_factory) -> Path:
    from sparsezip_deploy.export import build

    out = tmp_path_factory.mktemp("eval") / "tiny-sparsezip"
    with contextlib.redirect_stdout(io.StringIO()):
        assert build.main(["--model", str(tiny_dir), "--method", "sparsezip", "--out", str(out)]) == 0
    return out


def test_runner_end_to_end_on_pope(engine, tmp_path):
    root, out = mini_pope(tmp_path / "pope", per_split=2), tmp_path / "out"
    argv = ["--dataset", "pope", "--root", str(root), "--engines", str(engine), "--max-new-tokens", "2",
            "--out", str(out), "--seed", "3"]
    assert run.main([*argv, "--limit", "4"]) == 0
    predictions = out / "predictions" / f"pope-{engine.name}.jsonl"
    first = predictions.read_text().splitlines()
    assert json.loads(first[0])["header"]["max_new_tokens"] == 2 and len(first) == 1 + 4
    for line in first[1:]:
        record = json.loads(line)
        assert {"qid", "answer", "vision_ms", "prefill_ms", "ttft_ms", "total_ms"} <= set(record)
        assert record["total_ms"] >= record["ttft_ms"] > 0

    # All six now: the four answered are kept as they were (their timings too), two are added.
    assert run.main([*argv, "--limit", "6"]) == 0
    second = predictions.read_text().splitlines()
    assert second[:5] == first and len(second) == 1 + 6
    assert len({json.loads(line)["qid"] for line in second[1:]}) == 6

    report = json.loads((out / "pope.json").read_text())
    assert report["conditions"]["questions"] == 6 and report["conditions"]["seed"] == 3
    row = report["engines"][engine.name]
    assert row["method"] == "sparsezip" and row["answered"] == 6 and row["visual_tokens_kept_mean"] > 0
    assert set(row["scores"]["splits"]) == set(readers.POPE_SPLITS)
    for split in row["scores"]["splits"].values():
        assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(split) and split["questions"] == 2
    assert set(row["timing_ms"]) == {"vision_ms", "prefill_ms", "ttft_ms", "total_ms"}
    table = (out / "pope.md").read_text()
    assert engine.name in table and "F1 adversarial" in table
    assert (out / "pope-vs-tokens.png").stat().st_size > 0

    # Other settings against the same predictions: one line, exit 1.
    assert run.main([*argv, "--max-new-tokens", "3"]) == 1
