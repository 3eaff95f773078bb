"""llm_prune/reference.py on hand-worked examples, and llm_prune/oracle.py against transformers."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from sparsezip_deploy.export.models import load_model
from sparsezip_deploy.export.tiny import TinyConfig, build_tiny
from sparsezip_deploy.llm_prune import oracle, reference
from sparsezip_deploy.llm_prune.config import SparseVLMConfig, Stage

# -- raters


def test_raters_hand_worked():
    # slot 0 padding, visual [1, 4) with slot 2 masked out, text 4..6. Huge vectors sit in the
    # masked slots: they must not count. x_v . x_t for v = 1: (ln 2, 0, 0) -> softmax (1/2, 1/4, 1/4);
    # v = 3: (0, ln 3, 0) -> (1/5, 3/5, 1/5). r = (.35, .425, .225), mean 1/3: raters 4 and 5.
    x = np.array([[50.0, 50.0], [math.log(2), 0.0], [-40.0, 90.0], [0.0, math.log(3)],
                  [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    m = [0, 1, 0, 1, 1, 1, 1]
    assert reference.raters(x, m, vs=1, V=3) == [4, 5]


def test_raters_without_a_valid_visual_slot_are_every_text_token():
    x = np.arange(12.0).reshape(6, 2)
    assert reference.raters(x, [1, 0, 0, 1, 1, 1], vs=1, V=2) == [3, 4, 5]


# -- visual scores and the kept slots


def test_visual_scores_mean_over_heads_then_rows():
    P = np.zeros((2, 4, 4))
    P[0, 3], P[1, 3] = [.1, .2, .3, .4], [.4, .3, .2, .1]  # heads' mean at q = 3: .25 everywhere
    P[0, 2], P[1, 2] = [.5, .3, .2, 0], [.1, .1, .8, 0]    # at q = 2: (.3, .2, .5, 0)
    np.testing.assert_allclose(reference.visual_scores(P, [1, 1, 1, 1], 1, 2, [2, 3]), [.225, .375])
    np.testing.assert_allclose(reference.visual_scores(P, [1, 1, 1, 1], 1, 2, [3]), [.25, .25])
    assert reference.visual_scores(P, [1, 1, 0, 1], 1, 2, [2, 3]).tolist() == [pytest.approx(.225), -np.inf]


def test_keep_indices_ties_go_to_the_lower_index_and_come_back_in_order():
    scores = [0.1, 0.3, 0.3, -np.inf, 0.3, 0.2]
    assert reference.keep_indices(scores, 2) == [1, 2]
    assert reference.keep_indices(scores, 4) == [1, 2, 4, 5]
    assert reference.keep_indices(scores, 6) == [0, 1, 2, 3, 4, 5]
    assert reference.keep_indices([0.1, 0.5, 0.9], 2) == [1, 2]


# -- DPC-KNN


def test_density_peaks_the_densest_point_gets_the_largest_distance_of_all():
    # On a line 0, 1, 3 with c = 3: mean squared distances 10/3, 5/3, 13/3, so point 1 is densest;
    # its delta is the matrix max 3 (not its own row's max, 2).
    dist = reference.distances([[0.0], [1.0], [3.0]])
    rho, delta = reference.density_peaks(dist, 3)
    np.testing.assert_allclose(rho, np.exp([-10 / 3, -5 / 3, -13 / 3]))
    assert delta == [1.0, 3.0, 2.0]


def three_clusters():
    # Each cluster is 0, s, 3s along x (its middle point densest), s = .1, .2, .4: every point of a
    # tighter cluster is denser than every point of a looser one.
    base = [(0.0, 0.1, 0.3), (10.0, 10.2, 10.6), (20.0, 20.4, 21.2)]
    return np.array([[v, 0.0] for cluster in base for v in cluster])


def test_dpc_knn_finds_the_clusters():
    # Peaks 1, 4, 7; centre scores: 1 (delta the matrix max 21.2/sqrt 2) > 4 (9.9/sqrt 2) > 7 (9.8/sqrt 2,
    # less dense); every other point has delta <= .8/sqrt 2.
    X = three_clusters()
    centres, assignment, merged, merged_valid = reference.dpc_knn(X, [1] * 9, 3)
    assert centres == [1, 4, 7]
    assert assignment == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_allclose(merged, [[0.4 / 3, 0], [30.8 / 3, 0], [61.6 / 3, 0]])
    assert merged_valid == [1, 1, 1]


def test_dpc_knn_invalid_members_cluster_but_are_not_averaged():
    X = three_clusters()
    centres, assignment, merged, merged_valid = reference.dpc_knn(X, [1, 1, 0, 1, 0, 1, 0, 0, 0], 3)
    assert centres == [1, 4, 7] and assignment == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_allclose(merged, [[0.05, 0], [10.3, 0], [0, 0]])  # cluster 2: no valid member
    assert merged_valid == [1, 0, 0]


def test_dpc_knn_equal_densities_rank_by_index_and_a_centre_joins_itself():
    # Points 0 and 1 coincide: equally dense; point 0 counts as the denser (lower index), so point 1's
    # delta is 0 and it is no centre; point 2 is. Point 1 joins centre 0, each centre joins itself.
    centres, assignment, merged, _ = reference.dpc_knn([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0]], [1, 1, 1], 2)
    assert centres == [0, 2]
    assert assignment == [0, 0, 1]
    np.testing.assert_allclose(merged, [[0, 0], [3, 0]])


def test_dpc_knn_refuses_more_clusters_than_points():
    with pytest.raises(ValueError, match="3 clusters out of 2 points"):
        reference.dpc_knn(np.zeros((2, 4)), [1, 1], 3)


# -- one stage on a row


def tracked(S, vs, V, mask, raters=()):
    hidden = np.arange(S * 2, dtype=np.float64).reshape(S, 2) ** 1.5
    return reference.Tracked(hidden, list(range(S)), list(mask), [10 + q for q in range(S)],
                             [q in raters for q in range(S)], vs, V, [[q] for q in range(S)])


def received(S, columns, rows=None):
    """[1, S, S] probabilities where every query (or the `rows` given) gives `columns` {slot: p}."""
    P = np.zeros((1, S, S))
    for q in range(S) if rows is None else rows:
        for k, p in columns.items():
            P[0, q, k] = p
    return P


def test_prune_stage_fastv_rates_with_every_real_query():
    # Visual slots 1..3; every query gives (.1, .5, .3), but the one rater (slot 5) gives (.9, .0, .0):
    # FastV averages over all 6 real queries -> (.233, .417, .25): keeps slots 2, 3.
    seq = tracked(6, 1, 3, [1] * 6, raters={5})
    P = received(6, {1: .1, 2: .5, 3: .3}, rows=range(5)) + received(6, {1: .9}, rows=[5])
    new = reference.prune_stage(seq, P, Stage(0, 2), "fastv")
    assert new.slots == [0, 2, 3, 4, 5] and new.vs == 1 and new.vc == 2
    assert new.positions == [10, 12, 13, 14, 15] and new.mask == [1] * 5
    assert new.sources == [[0], [2], [3], [4], [5]]
    np.testing.assert_array_equal(new.hidden, seq.hidden[[0, 2, 3, 4, 5]])
    # SparseVLM rates with slot 5 alone -> (.9, .5, .3): keeps slots 1, 2.
    assert reference.prune_stage(seq, P, Stage(0, 2), "sparsevlm").slots == [0, 1, 2, 4, 5]


def test_prune_stage_sparsevlm_recycles_the_dropped_tokens():
    # Visual slots 1..5, slot 4 masked out; the rater (7) gives (.05, .4, .3, -, .1): keeps slots 2, 3.
    # Dropped by score: 5 (.1), 1 (.05), 4 (invalid); recycle = 1 takes all 3. With c = 1 every
    # density is 1 and every delta the matrix max: the centre is the first candidate, slot 5, and the
    # merged token is the mean of the valid members 5 and 1, at slot 5's position.
    seq = tracked(8, 1, 5, [1, 1, 1, 1, 0, 1, 1, 1], raters={7})
    P = received(8, {1: .05, 2: .4, 3: .3, 4: .9, 5: .1})
    new = reference.prune_stage(seq, P, Stage(0, 2, 1), "sparsevlm", SparseVLMConfig(recycle=1.0))
    assert new.slots == [0, 2, 3, -1, 6, 7] and new.vc == 3
    assert new.mask == [1, 1, 1, 1, 1, 1] and new.positions == [10, 12, 13, 15, 16, 17]
    assert new.raters == [False] * 5 + [True]
    assert new.sources == [[0], [2], [3], [5, 1], [6], [7]]
    np.testing.assert_allclose(new.hidden[3], (seq.hidden[5] + seq.hidden[1]) / 2)
    np.testing.assert_array_equal(new.hidden[[0, 1, 2, 4, 5]], seq.hidden[[0, 2, 3, 6, 7]])


def test_prune_stage_sparsevlm_merged_tokens_take_their_centres_mask_and_position():
    # As above, with hidden states: slot 1 (0, 0), slot 4 (1, 0), slot 5 (5, 0), and c = 2. Slots 1 and 4
    # are each other's nearest: equally dense, the densest; candidate 1 (slot 1) ranks first (index
    # order), candidate 2 (slot 4) is next (its delta is small but slot 5 is sparse). Slot 5 is nearer slot 4 and
    # joins it; that cluster's mask is slot 4's (0) and its mean is over slot 5 alone.
    seq = tracked(8, 1, 5, [1, 1, 1, 1, 0, 1, 1, 1], raters={7})
    hidden = seq.hidden.copy()
    hidden[[1, 4, 5]] = [[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]]
    seq = dataclasses.replace(seq, hidden=hidden)
    P = received(8, {1: .05, 2: .4, 3: .3, 4: .9, 5: .1})
    new = reference.prune_stage(seq, P, Stage(0, 2, 2), "sparsevlm", SparseVLMConfig(recycle=1.0))
    assert new.slots == [0, 2, 3, -1, -1, 6, 7] and new.vc == 4
    assert new.mask == [1, 1, 1, 1, 0, 1, 1] and new.positions == [10, 12, 13, 11, 14, 16, 17]
    assert new.sources == [[0], [2], [3], [1], [5], [6], [7]]
    np.testing.assert_array_equal(new.hidden[3:5], [[0.0, 0.0], [5.0, 0.0]])


def test_prune_stage_refuses_unknown_methods_and_a_missing_recycle_config():
    seq = tracked(5, 1, 3, [1] * 5, raters={4})
    P = received(5, {1: .1, 2: .2, 3: .3})
    with pytest.raises(ValueError, match="unknown in-LLM pruning method 'topk'"):
        reference.prune_stage(seq, P, Stage(0, 1), "topk")
    with pytest.raises(ValueError, match="needs the SparseVLM config"):
        reference.prune_stage(seq, P, Stage(0, 1, 1), "sparsevlm")


# -- the oracle against transformers

VISUAL = 12
QK_SCALE = 8.0  # random-init attention is nearly flat; this spreads the visual scores apart


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    model = load_model(build_tiny(tmp_path_factory.mktemp("tiny4"), 0, TinyConfig(llm_layers=4))).model
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(QK_SCALE)
            layer.self_attn.k_proj.weight.mul_(QK_SCALE)
    return model


def prompt(pads=(3, 0), prefixes=(2, 3), texts=(5, 7), seed=0):
    """Left-padded rows [pad | prefix text | VISUAL | text] -> embeds [B,S,D], mask, positions, visual_start."""
    g = torch.Generator().manual_seed(seed)
    S = pads[0] + prefixes[0] + VISUAL + texts[0]
    assert all(p + pre + VISUAL + t == S for p, pre, t in zip(pads, prefixes, texts))
    embeds = torch.randn(len(pads), S, 64, generator=g)
    mask = torch.ones(len(pads), S, dtype=torch.int64)
    for b, pad in enumerate(pads):
        embeds[b, :pad], mask[b, :pad] = 0, 0
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return embeds, mask, positions, torch.tensor([p + pre for p, pre in zip(pads, prefixes)])


def hf_last_logits(llava, embeds, mask, positions):
    """transformers' own forward (its default attention, its own mask) -> the last position's logits."""
    with torch.no_grad():
        out = llava.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        return llava.lm_head(out.last_hidden_state[:, -1]).numpy()


def with_tokens(llava, embeds, mask, positions, tokens):
    """The prompt followed by `tokens` [B, T], positions continuing from each row's real count."""
    T = tokens.shape[1]
    with torch.no_grad():
        new = llava.model.language_model.embed_tokens(torch.as_tensor(tokens))
    new_positions = mask.sum(1, keepdim=True) + torch.arange(T)
    return (torch.cat([embeds, new], 1), torch.cat([mask, torch.ones_like(mask[:, :T])], 1),
            torch.cat([positions, new_positions], 1))


def test_oracle_without_stages_is_transformers(llava):
    embeds, mask, positions, vs = prompt()
    result = oracle.run(llava, embeds, mask, positions, vs, VISUAL, "fastv", (), None, steps=3)
    np.testing.assert_allclose(result.prefill_logits, hf_last_logits(llava, embeds, mask, positions), atol=1e-5)
    assert result.slots == [] and result.tokens.shape == (2, 3)
    assert (result.tokens[:, 0] == result.prefill_logits.argmax(1)).all()
    for k, logits in enumerate(result.step_logits):
        full = with_tokens(llava, embeds, mask, positions, result.tokens[:, :k + 1])
        np.testing.assert_allclose(logits, hf_last_logits(llava, *full), atol=1e-5)
        if k + 1 < result.tokens.shape[1]:
            assert (result.tokens[:, k + 1] == logits.argmax(1)).all()
    assert llava.model.language_model.config._attn_implementation == "sdpa"  # restored


def hand_attention(layer, h, mask, positions, theta=10000.0):
    """One Llama layer's attention probabilities [H, S, S] from its input h [S, D], in float64 numpy."""
    attn = layer.self_attn
    w = {name: getattr(attn, name).weight.detach().double().numpy() for name in ("q_proj", "k_proj")}
    norm = layer.input_layernorm
    x = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + norm.variance_epsilon) * norm.weight.detach().double().numpy()
    hd = attn.head_dim
    q = (x @ w["q_proj"].T).reshape(len(h), -1, hd).transpose(1, 0, 2)  # [H, S, hd]
    k = (x @ w["k_proj"].T).reshape(len(h), -1, hd).transpose(1, 0, 2)  # [KV, S, hd]
    angle = np.asarray(positions, np.float64)[:, None] / theta ** (np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(np.concatenate([angle, angle], 1)), np.sin(np.concatenate([angle, angle], 1))

    def rope(v):
        return v * cos + np.concatenate([-v[..., hd // 2:], v[..., :hd // 2]], -1) * sin

    q, k = rope(q), rope(k)
    k = np.repeat(k, len(q) // len(k), axis=0)  # query head i reads kv head i // groups
    logits = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
    S = len(h)
    allowed = np.tril(np.ones((S, S), bool)) & (np.asarray(mask) > 0)[None, :]
    logits = np.where(allowed[None], logits, -1e30)  # a padding query: uniform, not NaN
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(-1, keepdims=True)


@pytest.mark.parametrize("method", ["fastv", "sparsevlm"])
def test_oracle_keeps_what_a_hand_computed_attention_ranks(llava, method):
    embeds, mask, positions, vs = prompt()
    keep = 5
    result = oracle.run(llava, embeds, mask, positions, vs, VISUAL, method, (Stage(1, keep),), None, steps=0)
    with torch.no_grad():
        hidden = llava.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                            output_hidden_states=True).hidden_states[1]  # layer 1's input
    layer = llava.model.language_model.layers[1]
    for b in range(2):
        m, start = mask[b].numpy(), int(vs[b])
        P = hand_attention(layer, hidden[b].double().numpy(), m, positions[b].numpy())
        if method == "fastv":
            rows = np.flatnonzero(m)
        else:
            rows = reference.raters(embeds[b].double().numpy(), m, start, VISUAL)
        scores = P[:, rows][:, :, start:start + VISUAL].mean(0).mean(0)  # heads, then rows
        ranked = np.sort(scores)[::-1]
        assert ranked[keep - 1] - ranked[keep] > 1e-3 * ranked[0], "scores too close for an index test"
        kept = reference.keep_indices(scores, keep)
        S = len(m)
        expected = list(range(start)) + [start + j for j in kept] + list(range(start + VISUAL, S))
        assert result.slots[0][b].tolist() == expected
        assert result.masks[0][b].tolist() == m[expected].tolist()
        assert result.positions[0][b].tolist() == positions[b, expected].tolist()


def masked_run(llava, embeds, mask, positions, alive):
    """HF's layers (default attention) on the full row b sequences, layer i's keys limited to alive[i] [B,S]."""
    lm = llava.model.language_model
    h, S = embeds, embeds.shape[1]
    with torch.no_grad():
        rope = lm.rotary_emb(h, positions)
        for layer, keys in zip(lm.layers, alive):
            allowed = torch.tril(torch.ones(S, S, dtype=torch.bool))[None] & (keys & (mask > 0))[:, None, :]
            additive = torch.where(allowed, 0.0, torch.finfo(h.dtype).min)[:, None]
            h = layer(h, attention_mask=additive, position_ids=positions, position_embeddings=rope)
        return llava.lm_head(lm.norm(h[:, -1])).numpy()


@pytest.mark.parametrize("method, stages", [("fastv", (Stage(1, 5),)),
                                            ("sparsevlm", (Stage(0, 8), Stage(2, 4)))])
def test_pruning_without_merging_is_masking_the_dropped_keys(llava, method, stages):
    # Positions travel with the tokens, so dropping a token is, for everything kept, the same as
    # masking its key in every later layer: prefill and decode steps alike.
    embeds, mask, positions, vs = prompt()
    steps = 2
    result = oracle.run(llava, embeds, mask, positions, vs, VISUAL, method, stages, None, steps=steps)
    B, S = mask.shape
    alive, keys = [], torch.ones(B, S + steps, dtype=torch.bool)
    for i in range(len(llava.model.language_model.layers)):
        alive.append(keys.clone())
        for k, stage in enumerate(stages):
            if stage.after == i:
                keys[:, :S] = False
                for b in range(B):
                    keys[b, result.slots[k][b]] = True
    full = with_tokens(llava, embeds, mask, positions, result.tokens)
    np.testing.assert_allclose(result.prefill_logits,
                               masked_run(llava, *(t[:, :S] for t in full), [a[:, :S] for a in alive]),
                               atol=1e-5)
    for step in range(steps):
        n = S + step + 1
        np.testing.assert_allclose(result.step_logits[step],
                                   masked_run(llava, *(t[:, :n] for t in full), [a[:, :n] for a in alive]),
                                   atol=1e-5)


def test_batch_rows_are_pruned_as_they_are_alone(llava):
    config = SparseVLMConfig(layers=(0, 2), keep=(6, 3))
    stages = config.stages(4, VISUAL)
    assert all(stage.merged > 0 for stage in stages)
    pads = (3, 0)
    embeds, mask, positions, vs = prompt(pads=pads)
    batch = oracle.run(llava, embeds, mask, positions, vs, VISUAL, "sparsevlm", stages, config, steps=3)
    merged = 0
    for k, stage in enumerate(stages):
        merged += stage.merged
        for b in range(2):
            slots = batch.slots[k][b]
            assert len(slots) == mask.shape[1] - VISUAL + stage.carried
            assert (slots == -1).sum() <= merged and (slots[int(vs[b]) + stage.keep:][:stage.merged] == -1).all()
    for b, pad in enumerate(pads):
        alone = oracle.run(llava, embeds[b:b + 1, pad:], mask[b:b + 1, pad:], positions[b:b + 1, pad:],
                           vs[b:b + 1] - pad, VISUAL, "sparsevlm", stages, config, steps=3)
        for k in range(len(stages)):
            shifted = np.where(batch.slots[k][b] >= 0, batch.slots[k][b] - pad, -1)[pad:]
            assert alone.slots[k][0].tolist() == shifted.tolist()
            assert alone.masks[k][0].tolist() == batch.masks[k][b][pad:].tolist()
            assert alone.positions[k][0].tolist() == batch.positions[k][b][pad:].tolist()
        np.testing.assert_allclose(alone.prefill_logits[0], batch.prefill_logits[b], atol=1e-5)
        for step in range(3):
            np.testing.assert_allclose(alone.step_logits[step][0], batch.step_logits[step][b], atol=1e-5)
        assert alone.tokens[0].tolist() == batch.tokens[b].tolist()
