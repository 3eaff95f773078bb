"""POPE, MME, DocVQA or GQA, in its official layout, on engine folders side by side.

    python benchmarks/eval/run.py --dataset pope --root data/pope \\
        --engines engines/none engines/sparsezip-64 --limit 500 --seed 0 --out benchmarks/results/eval

Every engine answers the same questions through the runtime's `Pipeline` (greedy), each
question with LLaVA-1.5's suffix line (readers.PROMPT_SUFFIX). `--limit N` keeps a fixed
subset drawn with `--seed`, the same for every engine: N questions, or for MME N images with
both their questions (so that acc+ stays defined).

Predictions go to OUT/predictions/<dataset>-<engine>.jsonl: a header line (the settings they
were made under; a rerun under others is refused), then one line per answer (question id,
answer text, vision / prefill / TTFT / total ms, visual tokens kept), flushed as written.
A rerun skips the questions already answered, so an interrupted run resumes.

Questions are grouped by image and each image is decoded once per engine, but the vision
graph still runs once per question: a question's KV cache must not hold another question's
turn (which `Conversation` would keep), and a cache of the image's trunk that a fresh
question could start from does not exist yet. Writes OUT/<dataset>.json (scores, per-engine
timings, run conditions), OUT/<dataset>.md (a table) and OUT/<dataset>-vs-tokens.png
(the headline score against the visual tokens the LLM saw).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py

from common import cpu_model, manifest_of  # noqa: E402
from metrics import SCORES, headline  # noqa: E402
from readers import PROMPT_SUFFIX, READERS, Sample  # noqa: E402
from sparsezip_deploy.runtime.errors import UserError  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results" / "eval"
TIMINGS = ("vision_ms", "prefill_ms", "ttft_ms", "total_ms")
PACKAGES = ("sparsezip-deploy", "numpy", "onnxruntime", "tokenizers", "Pillow")


class RunError(UserError):
    """Predictions on disk that this run cannot extend."""


@dataclass(frozen=True)
class EvalConfig:
    limit: int | None = None  # questions (MME: images) drawn; None: all
    seed: int = 0
    max_new_tokens: int = 16
    provider: str = "cpu"
    threads: int | None = None  # ONNX Runtime's default


def select(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """A seeded subset of `limit` units (dataset order kept); the same for every engine."""
    units = list(dict.fromkeys(s.unit for s in samples))
    if limit is None or limit >= len(units):
        return samples
    kept = set(random.Random(seed).sample(units, limit))
    return [s for s in samples if s.unit in kept]


def load_predictions(path: Path, header: dict) -> dict[str, dict]:
    """The answers already in `path` by question id; a torn last line (a killed run) is dropped."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"header": header}) + "\n", encoding="utf-8")
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        found = json.loads(lines[0])["header"] if lines else None
    except (json.JSONDecodeError, KeyError, TypeError):
        found = None
    if found != header:
        raise RunError(f"{path} holds predictions made under other settings ({found}); "
                       "delete it or choose another --out")
    done, good = {}, lines[:1]
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[record["qid"]] = record
        good.append(line)
    if len(good) != len(lines):
        path.write_text("\n".join(good) + "\n", encoding="utf-8")
    return done


def answer(dataset: str, name: str, engine: Path, samples: list[Sample], config: EvalConfig,
           path: Path) -> dict[str, dict]:
    """Every sample's prediction record for one engine: those on disk, then the rest, appended as made."""
    from tqdm import tqdm

    from sparsezip_deploy.runtime.pipeline import Pipeline
    from sparsezip_deploy.runtime.preprocess import load_image

    header = {"dataset": dataset, "engine": name, "prompt_suffix": PROMPT_SUFFIX[dataset],
              "max_new_tokens": config.max_new_tokens, "decoding": "greedy"}
    done = load_predictions(path, header)
    by_image: dict[Path, list[Sample]] = {}
    for s in samples:
        if s.qid not in done:
            by_image.setdefault(s.image, []).append(s)
    pending = sum(len(group) for group in by_image.values())
    with tqdm(total=len(samples), initial=len(samples) - pending, desc=name, unit="q", dynamic_ncols=True) as bar:
        if not pending:
            return done
        with Pipeline(engine, provider=config.provider, threads=config.threads) as pipe, \
                path.open("a", encoding="utf-8") as out:
            for image_path, group in by_image.items():
                image = load_image(image_path)
                for s in group:
                    t0 = time.perf_counter()
                    r = pipe.ask(image, s.prompt(dataset), config.max_new_tokens)
                    record = {"qid": s.qid, "answer": r.text.strip(), "vision_ms": r.vision_ms,
                              "prefill_ms": r.prefill_ms, "ttft_ms": r.ttft_ms,
                              "total_ms": (time.perf_counter() - t0) * 1e3,
                              "visual_tokens_kept": r.visual_tokens_kept, "new_tokens": len(r.token_ids)}
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                    done[s.qid] = record
                    bar.update()
    return done


def summarise(dataset: str, engine: Path, samples: list[Sample], records: dict[str, dict]) -> dict:
    rows = [records[s.qid] for s in samples]
    scores = SCORES[dataset](samples, {s.qid: records[s.qid]["answer"] for s in samples})
    label, value = headline(dataset, scores)
    return {"engine": str(engine), "method": manifest_of(engine).method_name, "answered": len(rows),
            "visual_tokens_kept_mean": statistics.fmean(r["visual_tokens_kept"] for r in rows),
            "headline": {"name": label, "value": value}, "scores": scores,
            "timing_ms": {k: {"median": statistics.median(r[k] for r in rows),
                              "mean": statistics.fmean(r[k] for r in rows)} for k in TIMINGS}}


def columns(dataset: str, scores: dict) -> dict[str, str]:
    """The dataset's own figures for the markdown table."""
    if dataset == "pope":
        cols = {k: f"{100 * scores['mean'][k]:.1f}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
        cols |= {f"F1 {split}": f"{100 * r['f1']:.1f}" for split, r in scores["splits"].items()}
        return cols
    if dataset == "mme":
        return {"perception": f"{scores['perception']:.1f}", "cognition": f"{scores['cognition']:.1f}"}
    if dataset == "docvqa":
        return {"ANLS": f"{100 * scores['anls']:.1f}", "exact match": f"{100 * scores['exact_match']:.1f}"}
    return {"accuracy": f"{100 * scores['accuracy']:.1f}"}


def markdown(report: dict) -> str:
    engines = report["engines"]
    own = [columns(report["dataset"], e["scores"]) for e in engines.values()]
    head = ["engine", "method", "kept", *own[0], *(f"{k} (median)" for k in TIMINGS)]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for (name, e), cols in zip(engines.items(), own):
        cells = [name, e["method"], f"{e['visual_tokens_kept_mean']:.1f}", *cols.values(),
                 *(f"{e['timing_ms'][k]['median']:.0f}" for k in TIMINGS)]
        lines.append("| " + " | ".join(cells) + " |")
    c = report["conditions"]
    return (f"{report['dataset']}: {c['questions']} questions of {c['questions_in_dataset']} "
            f"(limit {c['limit']}, seed {c['seed']}), greedy, {c['max_new_tokens']} new tokens at most, "
            f"{c['provider']}; percentages except MME's scores (max 2000 / 800)\n\n" + "\n".join(lines) + "\n")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, e in report["engines"].items():
        x, y = e["visual_tokens_kept_mean"], e["headline"]["value"]
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("visual tokens the LLM saw (mean)")
    ax.set_ylabel(next(iter(report["engines"].values()))["headline"]["name"])
    ax.set_title(f"{report['dataset']}: {report['conditions']['questions']} questions")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=list(READERS), required=True)
    p.add_argument("--root", type=Path, required=True, help="the dataset's folder in its official layout")
    p.add_argument("--engines", type=Path, nargs="+", required=True, help="engine folders, named by folder")
    p.add_argument("--limit", type=int, default=d.limit, help="questions (MME: images) drawn with --seed")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--provider", default=d.provider, help="ONNX Runtime provider: cpu | cuda | tensorrt")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--out", type=Path, default=RESULTS, help="report folder; predictions under predictions/")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    config = EvalConfig(args.limit, args.seed, args.max_new_tokens, args.provider, args.threads)
    engines = {e.name: e for e in args.engines}
    if len(engines) != len(args.engines):
        print("error: two engine folders share a name", file=sys.stderr)
        return 1
    for engine in engines.values():
        manifest_of(engine)  # every folder checked before the first one runs
    try:
        everything = READERS[args.dataset](args.root)
        samples = select(everything, config.limit, config.seed)
        if not samples:
            raise RunError(f"{args.root}: no questions")
        results = {}
        for name, engine in engines.items():
            records = answer(args.dataset, name, engine, samples, config,
                             args.out / "predictions" / f"{args.dataset}-{name}.jsonl")
            results[name] = summarise(args.dataset, engine, samples, records)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from sparsezip_deploy.runtime.manifest import tool_versions

    report = {"dataset": args.dataset, "conditions": {
        "root": str(args.root), "questions_in_dataset": len(everything), "questions": len(samples),
        "limit": config.limit, "seed": config.seed, "max_new_tokens": config.max_new_tokens,
        "prompt_suffix": PROMPT_SUFFIX[args.dataset], "decoding": "greedy", "batch": 1,
        "provider": config.provider, "threads": config.threads, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "versions": tool_versions(PACKAGES),
        "dtypes": {name: manifest_of(e).to_dict()["precision"] for name, e in engines.items()},
    }, "engines": results}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.dataset
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    Path(f"{stem}.md").write_text(markdown(report), encoding="utf-8")
    plot(report, Path(f"{stem}-vs-tokens.png"))
    for name, r in results.items():
        print(f"{name:28s} kept {r['visual_tokens_kept_mean']:6.1f}  {r['headline']['name']} "
              f"{r['headline']['value']:.4f}")
    print(f"wrote {stem}.json, {stem}.md and {stem}-vs-tokens.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
