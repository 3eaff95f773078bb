"""Readers for the official layouts of POPE, MME, DocVQA and GQA: each returns a list of `Sample`.

    pope    ROOT/coco_pope_{random,popular,adversarial}.json (or ROOT/coco/...): JSON lines
            {"question_id", "image", "text", "label": "yes"|"no"}; images in ROOT/val2014/
    mme     ROOT = MME_Benchmark_release_version/: per subtask either <subtask>/images/ +
            <subtask>/questions_answers_YN/<stem>.txt, or <stem>.<jpg|png> + <stem>.txt side by side;
            each .txt line `question<TAB>Yes|No` (two per image)
    docvqa  ROOT/val_v1.0.json {"data": [{"questionId", "question", "image": "documents/x.png",
            "answers": [...]}]}; image paths relative to ROOT
    gqa     ROOT/testdev_balanced_questions.json {qid: {"imageId", "question", "answer", ...}};
            images in ROOT/images/<imageId>.jpg

`PROMPT_SUFFIX` is what LLaVA-1.5's evaluation appends to every question, on its own line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sparsezip_deploy.runtime.errors import UserError

# LLaVA-1.5 (llava/eval/*, the playground question files) appends this line to POPE, MME and GQA
# questions; DocVQA is not in its eval set, and lmms-eval's LLaVA prompt for it is the same line.
PROMPT_SUFFIX: dict[str, str] = {
    "pope": "Answer the question using a single word or phrase.",
    "mme": "Answer the question using a single word or phrase.",
    "docvqa": "Answer the question using a single word or phrase.",
    "gqa": "Answer the question using a single word or phrase.",
}
POPE_SPLITS = ("random", "popular", "adversarial")
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DatasetError(UserError):
    """A dataset folder that is not in the official layout."""


@dataclass(frozen=True)
class Sample:
    qid: str  # unique within the dataset (POPE: "<split>/<question_id>", MME: "<subtask>/<stem>/<n>")
    image: Path
    question: str  # as the dataset states it, without PROMPT_SUFFIX
    answer: str | tuple[str, ...]  # gold: one answer, or DocVQA's list of accepted ones
    group: str = ""  # POPE split, MME subtask; "" for the others
    unit: str = ""  # samples sharing a unit are kept or dropped together by `--limit` (MME: one image)

    def prompt(self, dataset: str) -> str:
        return f"{self.question}\n{PROMPT_SUFFIX[dataset]}"


def read_pope(root: Path, splits: tuple[str, ...] = POPE_SPLITS) -> list[Sample]:
    images = _folder(root / "val2014")
    samples = []
    for split in splits:
        name = f"coco_pope_{split}.json"
        path = next((p for p in (root / name, root / "coco" / name) if p.is_file()), None)
        if path is None:
            raise DatasetError(f"no {name} in {root} or {root / 'coco'}")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = _json(line, f"{path}:{n}")
            label = _field(row, "label", path).strip().lower()
            if label not in ("yes", "no"):
                raise DatasetError(f"{path}:{n}: label {label!r}, expected yes or no")
            qid = f"{split}/{_field(row, 'question_id', path)}"
            samples.append(Sample(qid, images / _field(row, "image", path), _field(row, "text", path), label,
                                  group=split, unit=qid))
    return samples


def read_mme(root: Path) -> list[Sample]:
    samples = []
    for subtask in (*MME_PERCEPTION, *MME_COGNITION):
        folder = root / subtask
        if not folder.is_dir():
            continue  # a partial copy is scored on the subtasks it has
        if (folder / "questions_answers_YN").is_dir():
            pairs = [(_image(folder / "images", txt.stem), txt)
                     for txt in sorted((folder / "questions_answers_YN").glob("*.txt"))]
        else:
            pairs = [(_image(folder, txt.stem), txt) for txt in sorted(folder.glob("*.txt"))]
        for image, txt in pairs:
            lines = [line for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
            for n, line in enumerate(lines):
                question, tab, answer = line.rpartition("\t")
                if not tab or answer.strip().lower() not in ("yes", "no"):
                    raise DatasetError(f"{txt}:{n + 1}: expected 'question<TAB>Yes|No'")
                unit = f"{subtask}/{txt.stem}"
                samples.append(Sample(f"{unit}/{n}", image, question.strip(), answer.strip().lower(),
                                      group=subtask, unit=unit))
    if not samples:
        raise DatasetError(f"{root} holds none of MME's subtask folders ({', '.join(MME_PERCEPTION[:3])}, ...)")
    return samples


def read_docvqa(root: Path, file: str = "val_v1.0.json") -> list[Sample]:
    path = root / file
    if not path.is_file():
        raise DatasetError(f"no {file} in {root}")
    data = _field(_json(path.read_text(encoding="utf-8"), str(path)), "data", path)
    samples = []
    for row in data:
        qid = str(_field(row, "questionId", path))
        answers = tuple(_field(row, "answers", path))
        samples.append(Sample(qid, root / _field(row, "image", path), _field(row, "question", path), answers,
                              unit=qid))
    return samples


def read_gqa(root: Path, file: str = "testdev_balanced_questions.json") -> list[Sample]:
    path = root / file
    if not path.is_file():
        raise DatasetError(f"no {file} in {root}")
    images = _folder(root / "images")
    questions = _json(path.read_text(encoding="utf-8"), str(path))
    return [Sample(str(qid), images / f"{_field(q, 'imageId', path)}.jpg", _field(q, "question", path),
                   _field(q, "answer", path), unit=str(qid)) for qid, q in questions.items()]


READERS = {"pope": read_pope, "mme": read_mme, "docvqa": read_docvqa, "gqa": read_gqa}


def _folder(path: Path) -> Path:
    if not path.is_dir():
        raise DatasetError(f"no image folder {path}")
    return path


def _image(folder: Path, stem: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise DatasetError(f"no image {stem}{{{','.join(IMAGE_SUFFIXES)}}} in {folder}")


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not JSON ({e})") from None


def _field(row, key: str, path: Path):
    if not isinstance(row, dict) or key not in row:
        raise DatasetError(f"{path}: an entry without {key!r}")
    return row[key]
