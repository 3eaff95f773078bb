"""The large held-out set and the POPE splits: fixed, balanced, disjoint, negatives really absent."""
from __future__ import annotations

from collections import Counter

import numpy as np

from sparsezip_deploy.scenes.questions import (HELDOUT_LARGE_PER_TYPE, HELDOUT_LARGE_SEED, HELDOUTS, POPE_SPLITS,
                                               TYPES, heldout, objects, pope)
from sparsezip_deploy.scenes.scene import COLOURS, KINDS, sample_scene


def test_large_heldout_is_fixed_balanced_and_disjoint():
    large = heldout(HELDOUT_LARGE_PER_TYPE, HELDOUT_LARGE_SEED)
    assert large == heldout(*reversed(HELDOUTS["large"]))
    assert len(large) == 1200 >= 6 * 200
    assert Counter(e.question.type for e in large) == {t: HELDOUT_LARGE_PER_TYPE for t in TYPES}
    assert sum(e.question.small for e in large) >= len(large) // 3
    old = {e.scene for e in heldout()}
    rng = np.random.default_rng(7)  # accuracy.py's calibration scenes
    calibration = {sample_scene(rng) for _ in range(200)}
    training = {sample_scene(np.random.default_rng(seed)) for seed in range(20)}
    scenes = {e.scene for e in large}
    assert not scenes & old and not scenes & calibration and not scenes & training
    assert heldout(5) == heldout(5), "the 300-question set's stream changed"


def test_pope_is_fixed_balanced_and_its_negatives_absent():
    splits = pope(per_split=40)
    assert splits == pope(per_split=40) and tuple(splits) == POPE_SPLITS
    pairs = [(c, k) for c in COLOURS for k in KINDS]
    for split, examples in splits.items():
        assert len(examples) == 80 and Counter(e.question.answer for e in examples) == {"Yes": 40, "No": 40}
        scenes = [examples[i].scene for i in range(0, len(examples), 2)]
        frequency = Counter(p for s in scenes for p in objects(s))
        for yes, no in zip(examples[::2], examples[1::2]):
            assert yes.scene == no.scene
            asked_yes = tuple(yes.question.text.rstrip("?").split()[-2:])
            asked_no = tuple(no.question.text.rstrip("?").split()[-2:])
            here = objects(yes.scene)
            assert asked_yes in here and asked_no in pairs and asked_no not in here
            if split == "popular":
                assert frequency[asked_no] == max(frequency[p] for p in pairs if p not in here)
            if split == "adversarial":
                assert asked_no[0] == asked_yes[0] or asked_no[1] == asked_yes[1]
    # Popular negatives are more frequent than random ones on average: the split means something.
    mean = {}
    for split in ("random", "popular"):
        scenes = [e.scene for e in splits[split][::2]]
        frequency = Counter(p for s in scenes for p in objects(s))
        mean[split] = np.mean([frequency[tuple(e.question.text.rstrip("?").split()[-2:])]
                               for e in splits[split][1::2]])
    assert mean["popular"] > mean["random"]
