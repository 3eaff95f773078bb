"""The official scores of POPE, MME, DocVQA and GQA, from answers keyed by question id.

Each `*_scores(samples, answers)` scores the samples that have an answer (a `--limit` run
answers a subset) and returns a JSON-ready dict. Definitions and their sources:

- POPE (LLaVA's llava/eval/eval_pope.py): an answer is cut at its first '.', commas removed,
  split on spaces; "no" if the words hold "No", "not" or "no", otherwise "yes" (case-sensitive,
  as there: "NO" and "Not" count as yes). Positive = yes. accuracy = (TP + TN) / N,
  precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R), yes ratio = predicted
  yes / N; a 0/0 is 0. Per split, and the mean of each over the splits present.
- MME (the benchmark's eval_tool/calculation.py): the answer lowercased (and stripped); "yes" / "no"
  if it is exactly that, else "yes" if its first 4 characters hold "yes", else "no" if they hold
  "no", else "other" (always wrong). Per subtask: acc = right questions / questions, acc+ = images
  with every question right / images, score = 100 acc + 100 acc+; perception and cognition
  totals are sums of their subtasks' scores (max 2000 and 800).
- DocVQA (ANLS, Biten et al. 2019, "Scene Text Visual Question Answering"; the RRC evaluation):
  answers and predictions lowercased and stripped; NL = Levenshtein distance / max(len);
  per question max over the gold answers of (1 - NL if NL < 0.5 else 0); ANLS = mean.
  exact match: the normalised prediction equals one normalised gold answer.
- GQA: exact match after `normalize_answer` on both sides (the official eval.py compares raw
  strings; LLaVA's convert_gqa_for_eval.py lowercases and strips a final '.'; this is a superset).
"""
from __future__ import annotations

import re
from collections import defaultdict

from readers import MME_COGNITION, MME_PERCEPTION, Sample

ANLS_THRESHOLD = 0.5

# VQA's normalisation (vqaEval.py: processPunctuation, processDigitArticle), the parts kept here:
# its punctuation list, its period and comma rules, number words to digits, articles dropped.
# Its contraction table ("dont" -> "don't", ...) is left out.
VQA_PUNCTUATION = tuple(";/[]\"{}()=+\\_-><@`,?!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")


# -- POPE

def pope_answer(text: str) -> str:
    text = text.strip()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def binary_scores(gold: list[str], pred: list[str]) -> dict:
    """Yes-positive confusion counts and POPE's five figures over aligned yes/no lists."""
    tp = sum(g == "yes" and p == "yes" for g, p in zip(gold, pred))
    fp = sum(g == "no" and p == "yes" for g, p in zip(gold, pred))
    tn = sum(g == "no" and p == "no" for g, p in zip(gold, pred))
    fn = sum(g == "yes" and p == "no" for g, p in zip(gold, pred))
    n = len(gold)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"accuracy": _ratio(tp + tn, n), "precision": precision, "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall), "yes_ratio": _ratio(tp + fp, n),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "questions": n}


def pope_scores(samples: list[Sample], answers: dict[str, str]) -> dict:
    by_split: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for s in samples:
        if s.qid in answers:
            by_split[s.group][0].append(s.answer)
            by_split[s.group][1].append(pope_answer(answers[s.qid]))
    splits = {split: binary_scores(gold, pred) for split, (gold, pred) in by_split.items()}
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    mean = {k: sum(r[k] for r in splits.values()) / len(splits) for k in keys} if splits else {}
    return {"splits": splits, "mean": mean}


# -- MME

def mme_answer(text: str) -> str:
    text = text.lower().strip()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def mme_scores(samples: list[Sample], answers: dict[str, str]) -> dict:
    right: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))  # subtask -> image -> hits
    for s in samples:
        if s.qid in answers:
            right[s.group][s.unit].append(mme_answer(answers[s.qid]) == s.answer)
    subtasks = {}
    for subtask, images in right.items():
        hits = [h for image in images.values() for h in image]
        acc, acc_plus = sum(hits) / len(hits), sum(all(image) for image in images.values()) / len(images)
        subtasks[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus),
                             "questions": len(hits), "images": len(images)}
    perception = sum(subtasks[t]["score"] for t in MME_PERCEPTION if t in subtasks)
    cognition = sum(subtasks[t]["score"] for t in MME_COGNITION if t in subtasks)
    missing = [t for t in (*MME_PERCEPTION, *MME_COGNITION) if t not in subtasks]
    return {"subtasks": subtasks, "perception": perception, "cognition": cognition,
            "total": perception + cognition, "missing_subtasks": missing}


# -- DocVQA

def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, gold: tuple[str, ...] | list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """One question's ANLS: the best (1 - NL) over the gold answers, 0 where NL >= threshold."""
    pred = prediction.strip().lower()
    best = 0.0
    for answer in gold:
        answer = answer.strip().lower()
        longest = max(len(answer), len(pred))
        nl = levenshtein(answer, pred) / longest if longest else 0.0
        best = max(best, 1 - nl if nl < threshold else 0.0)
    return best


def docvqa_scores(samples: list[Sample], answers: dict[str, str]) -> dict:
    scored = [(answers[s.qid], s.answer) for s in samples if s.qid in answers]
    return {"anls": _mean([anls(pred, gold) for pred, gold in scored]),
            "exact_match": _mean([pred.strip().lower() in {g.strip().lower() for g in gold}
                                  for pred, gold in scored]),
            "questions": len(scored)}


# -- GQA

def normalize_answer(text: str) -> str:
    """VQA-style: lowercase; punctuation dropped (or made a space); number words to digits; no articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    # As vqaEval: a mark is deleted where it touches a space (or the text has a digit-comma-digit),
    # else it splits words ("black/white" -> "black white"); commas in numbers go ("1,000" -> "1000").
    original, strip = text, bool(_COMMA_IN_NUMBER.search(text))
    for p in VQA_PUNCTUATION:
        text = text.replace(p, "" if strip or f"{p} " in original or f" {p}" in original else " ")
    text = _PERIOD_NOT_DECIMAL.sub("", text)  # "yes." -> "yes", "3.5" stays
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def gqa_scores(samples: list[Sample], answers: dict[str, str]) -> dict:
    hits = [normalize_answer(answers[s.qid]) == normalize_answer(s.answer) for s in samples if s.qid in answers]
    return {"accuracy": _mean(hits), "questions": len(hits)}


SCORES = {"pope": pope_scores, "mme": mme_scores, "docvqa": docvqa_scores, "gqa": gqa_scores}


def headline(dataset: str, scores: dict) -> tuple[str, float]:
    """The one figure per dataset the table leads with and the plot draws."""
    if dataset == "pope":
        return "F1 (mean of splits)", scores["mean"].get("f1", 0.0)
    if dataset == "mme":
        return "perception + cognition", scores["total"]
    if dataset == "docvqa":
        return "ANLS", scores["anls"]
    return "accuracy", scores["accuracy"]


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else 0.0
