"""How sparsezip's text term should join the visual score, chosen on calibration scenes.

    python benchmarks/text_term.py                      # the bundled shapes model, 600 calibration questions
    python benchmarks/text_term.py --model models/shapes --per-type 50

What is measured is the selection itself, on the model's own features (PyTorch,
the modules export/vision.py exports): for each question that names a shape
(colour, exists-yes, position, small, small_colour; count names every shape of
its kind), the share of that shape's patches among the kept ones (`recall`) and
whether any of them is kept (`hit`: a shape with no kept patch is lost to the
LLM). Every fusion (`SparseZipConfig.fusion`) and text form at each beta, at
the budgets of 32 and 64 tokens, against beta 0 (the visual score alone).

The scenes are drawn with CALIBRATION_SEED, not with any held-out seed: the
default beta is chosen here (`--choose`: the beta of the default fusion and
form with the best mean hit rate over both budgets; ties to the smaller beta)
and never on the questions the accuracy benchmark scores. Writes JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sparsezip_deploy.scenes.questions import heldout
from sparsezip_deploy.scenes.scene import render
from sparsezip_deploy.sparsezip.config import FUSIONS, TEXT_FORMS, SparseZipConfig

from accuracy import contextual

RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATION_SEED = 20251216  # not scenes.questions' held-out or POPE seeds
BETAS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
BUDGETS = (32, 64)
PATCH_COVER = 0.25  # a patch belongs to a shape when the shape covers this share of its pixels


def budget_config(budget: int, **options) -> SparseZipConfig:
    """CLS + K + m tokens, split as benchmarks/accuracy.py splits its budgets."""
    m = contextual(budget)
    k = budget - 1 - m
    return SparseZipConfig(k_max=k, k_min=k, contextual=m, candidates=max(128, k), **options)


def named_patches(example, patch: int) -> np.ndarray:
    """[P] bool: the patches of the shape(s) the question names."""
    scene, question = example.scene, example.question
    _, owner = render(scene)
    if question.type == "count":
        kind = question.text.split()[2][:-1]  # "How many {kind}s are there?"
        wanted = [i for i, s in enumerate(scene.shapes) if s.kind == kind]
    elif question.type in ("small", "small_colour"):
        wanted = [scene.shapes.index(scene.small)]
    else:  # colour: "the {kind}"; exists / position: "{colour} {kind}"
        wanted = [i for i, s in enumerate(scene.shapes)
                  if s.kind in question.text and (question.type == "colour" or s.colour in question.text)]
    grid = owner.shape[0] // patch
    cells = owner.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    return np.isin(cells, [i + 1 for i in wanted]).mean(1) >= PATCH_COVER


def usable(example) -> bool:
    """Questions whose words point at patches: not "Is there ...?" answered No, not a count of 0."""
    q = example.question
    return not (q.type == "exists" and q.answer == "No") and not (q.type == "count" and q.answer == "0")


def features(graph, examples, image_config, tokenizer, table: np.ndarray, batch: int = 16):
    """Per chunk of examples: the tower's (h, cls_attn, kmet) and the prompts' text feeds."""
    from sparsezip_deploy.runtime.generate import text_features
    from sparsezip_deploy.runtime.preprocess import preprocess_batch

    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        pixels = torch.from_numpy(preprocess_batch([render(e.scene)[0] for e in chunk], image_config))
        text = text_features(table, [tokenizer.encode(e.question.text, add_special_tokens=False).ids
                                     for e in chunk])
        with torch.no_grad():
            yield chunk, graph.encode(pixels), torch.from_numpy(text["text_embeds"]), \
                torch.from_numpy(text["text_mask"])


def score(kept: np.ndarray, named: np.ndarray) -> tuple[float, float]:
    """(recall, hit) of one question's named patches among `kept` (kept_index row)."""
    chosen = np.zeros(len(named), bool)
    chosen[kept[kept >= 0]] = True
    found = (chosen & named).sum()
    return found / max(named.sum(), 1), float(found > 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes", help="a llava-hf folder, or 'shapes' (the bundled default)")
    p.add_argument("--per-type", type=int, default=100, help="calibration questions per type")
    p.add_argument("--out", type=Path, default=RESULTS / "text_term.json")
    args = p.parse_args(argv)

    from tokenizers import Tokenizer

    from sparsezip_deploy.export.models import load_model
    from sparsezip_deploy.export.vision import VisionGraph
    from sparsezip_deploy.sparsezip.modules import build_compressor, contrast, text_relevance

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    graph = VisionGraph(loaded.model, SparseZipConfig()).eval()
    tokenizer = Tokenizer.from_str(loaded.tokenizer.to_str())
    table = loaded.model.get_input_embeddings().weight.detach().float().numpy()
    examples = [e for e in heldout(per_type=args.per_type, seed=CALIBRATION_SEED) if usable(e)]
    named = [named_patches(e, graph.patch_size) for e in examples]
    variants = {(b, "visual", "-", 0.0): budget_config(b, beta=0.0) for b in BUDGETS}
    for b in BUDGETS:
        for form in TEXT_FORMS:
            for fusion in FUSIONS:
                for beta in BETAS:
                    variants[(b, form, fusion, beta)] = budget_config(b, beta=beta, fusion=fusion, text_form=form)
    compressors = {key: build_compressor(config, graph.project_float32) for key, config in variants.items()}
    figures = {key: [] for key in variants}
    gates = []
    with torch.no_grad():
        done = 0
        for chunk, feats, text_embeds, text_mask in features(graph, examples, loaded.image, tokenizer, table):
            text_vis = graph.text_to_vision(text_embeds)
            gates += contrast(text_relevance(feats[0][:, 1:], text_vis, text_mask, True)).flatten().tolist()
            for key, compressor in compressors.items():
                text = text_embeds if key[1] == "forward" else text_vis
                kept = compressor(*feats, text, text_mask)[2].numpy()
                for i, row in enumerate(kept):
                    figures[key].append(score(row, named[done + i]))
            done += len(chunk)
            print(f"{done}/{len(examples)} questions {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    for (budget, form, fusion, beta), values in figures.items():
        recall, hit = np.mean(values, 0)
        rows.append(dict(budget=budget, text_form=form, fusion=fusion, beta=beta,
                         recall=round(float(recall), 4), hit=round(float(hit), 4)))
    default = SparseZipConfig()
    candidates = [r for r in rows if r["text_form"] == default.text_form and r["fusion"] == default.fusion]
    by_beta = {beta: np.mean([r["hit"] for r in candidates if r["beta"] == beta]) for beta in BETAS}
    chosen = max(BETAS, key=lambda beta: (round(by_beta[beta], 4), -beta))
    report = dict(model=str(loaded.source.get("path", args.model)), calibration_seed=CALIBRATION_SEED,
                  questions=len(examples), patch_cover=PATCH_COVER, rows=rows,
                  transposed_contrast=dict(mean=round(float(np.mean(gates)), 4),
                                           p10=round(float(np.percentile(gates, 10)), 4),
                                           p90=round(float(np.percentile(gates, 90)), 4)),
                  chosen=dict(fusion=default.fusion, text_form=default.text_form, beta=chosen,
                              mean_hit=round(float(by_beta[chosen]), 4)),
                  seconds=round(time.perf_counter() - t0, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for budget in BUDGETS:
        print(f"\nbudget {budget}: hit / recall of the named shape's patches")
        for r in rows:
            if r["budget"] == budget:
                print(f"  {r['text_form']:10} {r['fusion']:6} beta {r['beta']:<4} hit {r['hit']:.3f} recall {r['recall']:.3f}")
    print(f"\nchosen: {report['chosen']}; transposed-form contrast {report['transposed_contrast']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
