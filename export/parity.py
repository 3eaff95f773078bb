"""One comparator for exported graphs against their PyTorch source.

Integer outputs must match exactly; float outputs within the tolerance of
their dtype and output, measured against the reference's largest magnitude.
A mismatch raises ParityError: a failing parity check stops the build.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ExportError

# (atol, rtol) by dtype, then output ("": any other): |a - b| <= atol + rtol * max|b| elementwise.
# float16 visual tokens and CLS attention are small numbers (a probability over N tokens is about 1/N):
# an atol of 1e-2 would pass anything. The float16 vision tower is measured at ~1.5e-3 of max|b|.
TOLERANCES = {
    "float32": {"": (1e-4, 1e-4)},
    "float16": {"": (1e-2, 1e-2), "visual_tokens": (1e-3, 1e-2), "cls_attn": (1e-4, 2e-2)},
}
# Merged (contextual) visual tokens are means over clusters chosen by argmax; a
# token whose two best clusters tie to within float rounding can land in either
# in torch and in ORT, moving a merged token by about that token's weight share.
# Such slots are held to a relative L2 bound instead, and only they.
MERGED_REL_L2 = 0.05
# Selection ties. ORT and PyTorch sum the float32 scores in different orders: on
# the default model's generated scenes they differ by up to ~3e-5 in a score range
# of ~1.4, and a patch that close to the top-K threshold can be kept by one and
# dropped by the other, which says nothing about the export. A patch counts as
# tied when the reference's own score lies within this fraction of the row's
# score range of the threshold (the midpoint of the K-th and K+1-th scores).
SCORE_TIE_RTOL = 1e-4
# A dynamic K whose unrounded value c + g log var(s) lies this close to a rounding
# boundary may round either way (var(s) agrees to ~1e-5 relative: g x 1e-5 << 1e-3).
K_TIE_ATOL = 1e-3


class ParityError(ExportError):
    pass


class SelectionError(ParityError):
    """ORT kept a patch the reference's own scores do not put within the tie window of the threshold."""


@dataclass(frozen=True)
class Comparison:
    name: str
    max_abs_err: float
    bound: float
    ok: bool

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return f"{self.name}: max |err| {self.max_abs_err:.3g} (bound {self.bound:.3g}) {verdict}"


def tolerance(dtype: str, output: str) -> tuple[float, float]:
    table = TOLERANCES[dtype]
    return table.get(output, table[""])


def compare(name: str, expected: np.ndarray, actual: np.ndarray, dtype: str = "float32",
            output: str | None = None) -> Comparison:
    """`output` picks the tolerance (default: `name`)."""
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        return Comparison(f"{name} shape {actual.shape} vs {expected.shape}", float("inf"), 0.0, False)
    if np.issubdtype(expected.dtype, np.integer) or expected.dtype == bool:
        wrong = int((expected != actual).sum())
        return Comparison(name, float(wrong), 0.0, wrong == 0)
    atol, rtol = tolerance(dtype, name if output is None else output)
    bound = atol + rtol * float(np.abs(expected).max(initial=0.0))
    err = float(np.abs(expected.astype(np.float64) - actual.astype(np.float64)).max(initial=0.0))
    return Comparison(name, err, bound, err <= bound)


def check(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], dtype: str = "float32") -> list[Comparison]:
    """Compare every output; raise ParityError naming each one that fails."""
    results = [compare(name, expected[name], actual[name], dtype) for name in expected]
    failed = [str(r) for r in results if not r.ok]
    if failed:
        raise ParityError("parity check failed: " + "; ".join(failed))
    return results


def check_visual_tokens(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray],
                        dtype: str = "float32") -> list[Comparison]:
    """The vision graph's outputs: counts and indices exact, kept tokens elementwise, merged ones by L2."""
    results = check({k: expected[k] for k in ("num_tokens", "kept_index")}, actual)
    want, got = expected["visual_tokens"], actual["visual_tokens"]
    slot = np.arange(want.shape[1])[None, :]
    merged = (expected["kept_index"] < 0) & (slot > 0) & (slot < expected["num_tokens"][:, None])
    kept = compare("visual_tokens (CLS, kept patches, padding)", want * ~merged[..., None],
                   got * ~merged[..., None], dtype, output="visual_tokens")
    if not kept.ok:
        raise ParityError(f"parity check failed: {kept}")
    results.append(kept)
    rel = np.linalg.norm(got - want, axis=-1) / np.maximum(np.linalg.norm(want, axis=-1), 1e-12)
    worst = float(rel[merged].max(initial=0.0))
    merged_result = Comparison("visual_tokens (merged slots), relative L2", worst, MERGED_REL_L2,
                               worst <= MERGED_REL_L2)
    if not merged_result.ok:
        raise ParityError(f"parity check failed: {merged_result}")
    return results + [merged_result]


def dominant_sets(kept_index: np.ndarray, num_patches: int) -> np.ndarray:
    """kept_index [B,S] (-1: not a patch) -> [B,P] bool, the patches each row keeps."""
    sets = np.zeros((len(kept_index), num_patches), dtype=bool)
    for row, kept in enumerate(kept_index):
        sets[row, kept[kept >= 0]] = True
    return sets


def check_selection(expected_kept: np.ndarray, actual_kept: np.ndarray, scores: np.ndarray,
                    unrounded_k: np.ndarray | None = None) -> tuple[Comparison, np.ndarray | None]:
    """Which patches ORT kept against the reference's own scores [B,P].

    Equal sets: exact, and (Comparison, None). A row may differ only where the
    reference's scores tie (SCORE_TIE_RTOL) at its top-K threshold, and its K only
    where the unrounded dynamic K ties at a rounding boundary (K_TIE_ATOL): then
    (Comparison naming the tied rows and patches, ORT's sets [B,P] bool), so the
    caller compares everything else against the reference run on ORT's choice.
    Any other difference raises SelectionError.
    """
    scores = np.asarray(scores, dtype=np.float64)
    want, got = dominant_sets(expected_kept, scores.shape[1]), dominant_sets(actual_kept, scores.shape[1])
    if (want == got).all():
        return Comparison("kept_index (selected patches)", 0.0, 0.0, True), None
    ties, worst, bound = [], 0.0, 0.0
    for row in np.flatnonzero((want != got).any(-1)):
        k, k_ref = int(got[row].sum()), int(want[row].sum())
        if k != k_ref and (unrounded_k is None or abs(unrounded_k[row] % 1.0 - 0.5) > K_TIE_ATOL):
            raise SelectionError(f"parity check failed: kept_index row {row}: ORT keeps {k} patches, "
                                 f"the reference {k_ref}")
        s = scores[row]
        order = np.lexsort((np.arange(len(s)), -s))  # by descending score, ties by lower index
        top = np.zeros(len(s), dtype=bool)
        top[order[:k]] = True
        threshold = (s[order[k - 1]] + s[order[k]]) / 2
        tol = SCORE_TIE_RTOL * float(s.max() - s.min())
        differ = np.flatnonzero(top != got[row])
        off = np.abs(s[differ] - threshold)
        if (off > tol).any():
            far = differ[off > tol]
            raise SelectionError(
                f"parity check failed: kept_index row {row}: patches {', '.join(map(str, far.tolist()))} kept "
                f"by one side only, {off.max():.3g} from the top-{k} threshold (ties within {tol:.3g})")
        ties.append(f"row {row}: {', '.join(map(str, differ.tolist()))}" if len(differ) else f"row {row}: K")
        worst, bound = max(worst, float(off.max(initial=0.0))), max(bound, tol)
    return Comparison(f"kept_index (selected patches; top-K ties, compared on ORT's choice: {'; '.join(ties)})",
                      worst, bound, True), got
