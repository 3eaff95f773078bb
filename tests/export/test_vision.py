"""vision.onnx per method: ORT vs PyTorch vs the references vs transformers, and graph rules."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from sparsezip_deploy.export.parity import ParityError, check_visual_tokens
from sparsezip_deploy.export.vision import VisionGraph, check_vision, example_inputs, export_vision, run_onnx
from sparsezip_deploy.sparsezip.config import NoneConfig, SparseZipConfig, VisionZipConfig
from sparsezip_deploy.sparsezip.reference import reference

METHODS = {
    "none": NoneConfig(),
    "visionzip": VisionZipConfig(),
    "sparsezip": SparseZipConfig(beta=0.0),
    "sparsezip-text": SparseZipConfig(beta=4.0),  # the gated term: at most beta x contrast (~0.4 here)
    "sparsezip-forward": SparseZipConfig(beta=1.0, text_form="forward", candidates=100),
    "sparsezip-dynamic": SparseZipConfig(beta=1.0, dynamic_k=True, k_offset=75.0, k_scale=6.0, k_min=16,
                                         k_max=96, contextual=12),
}
# ORT and torch differ by float rounding in CLIP. Merged tokens can differ more
# where a token ties between two clusters: check_visual_tokens bounds those slots.
TOKEN_ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision")
    graphs = {}
    for name, config in METHODS.items():
        graph = VisionGraph(tiny.model, config).eval()
        export_vision(graph, folder / f"{name}.onnx")
        graphs[name] = (graph, folder / f"{name}.onnx")
    return graphs


def torch_outputs(graph, feeds):
    with torch.no_grad():
        return [t.numpy() for t in graph(**feeds)]


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("batch,text_len", [(1, 3), (3, 11)])
def test_ort_equals_torch(exported, name, batch, text_len):
    graph, path = exported[name]
    feeds = example_inputs(graph, batch=batch, text_len=text_len, seed=5)
    expected = dict(zip(graph.io().outputs, torch_outputs(graph, feeds)))
    got = run_onnx(path, feeds)
    assert got["visual_tokens"].shape == (batch, graph.num_slots, graph.out_width)
    assert all(c.ok for c in check_visual_tokens(expected, got))


@pytest.mark.parametrize("name", list(METHODS))
def test_ort_selects_what_the_reference_selects(exported, name):
    """The exported graph (ONNX TopK, ArgMax, ...) against the loop reference fed layer l*'s features."""
    graph, path = exported[name]
    feeds = example_inputs(graph, batch=2, seed=9)
    got = run_onnx(path, feeds)
    with torch.no_grad():
        h, cls_attn, kmet = graph.encode(feeds["pixel_values"])
        text_vis = None
        if graph.text_aware:
            text_vis = feeds["text_embeds"] @ graph.projector.linear_2.weight @ graph.projector.linear_1.weight
        if graph.text_aware and graph.method.text_form == "forward":
            text_vis = feeds["text_embeds"]  # the forward form reads the text where it is, in the LLM space

    def project(patch):  # the reference's forward form: one patch through the whole projector
        with torch.no_grad():
            return graph.projector(torch.from_numpy(patch).float()).double().numpy()
    refs = [reference(graph.method, h[b].numpy(), cls_attn[b].numpy(), kmet[b].numpy(),
                      None if text_vis is None else text_vis[b].numpy(),
                      None if text_vis is None else feeds["text_mask"][b].numpy(), project) for b in range(2)]
    with torch.no_grad():
        projected = [graph.projector(torch.from_numpy(r.tokens).float()).numpy() for r in refs]
    expected = {
        "num_tokens": np.array([r.num_tokens for r in refs]),
        "kept_index": np.stack([r.kept_index for r in refs]),
        "visual_tokens": np.stack([p * (np.arange(len(p)) < r.num_tokens)[:, None] for p, r in zip(projected, refs)]),
    }
    assert all(c.ok for c in check_visual_tokens(expected, got))


def test_parity_check_fails_loudly(exported):
    graph, path = exported["sparsezip"]
    feeds = example_inputs(graph, batch=1)
    expected = dict(zip(graph.io().outputs, torch_outputs(graph, feeds)))
    for name, damage in [("kept_index", lambda o: o["kept_index"].__setitem__((0, 1), 575)),
                         ("kept token", lambda o: o["visual_tokens"].__setitem__((0, 1, 0), 1.0)),
                         ("merged token", lambda o: o["visual_tokens"].__setitem__((0, graph.num_slots - 1),
                                                                                  o["visual_tokens"][0, -1] * 1.2))]:
        got = run_onnx(path, feeds)
        damage(got)
        with pytest.raises(ParityError):
            check_visual_tokens(expected, got)


def test_selection_moved_by_tower_rounding_is_checked_on_orts_tower(exported, monkeypatch):
    """check_vision's fallback: when torch's own tower features select other patches than ORT's graph
    (here: torch's first encode has its CLS attention reversed, as if rounding had moved every score),
    the graph is checked in two parts, the trunk within tolerance and the selection on ORT's trunk."""
    graph, path = exported["sparsezip"]
    encode, calls = graph.encode, []

    def first_call_moved(pixel_values):
        h, cls_attn, kmet = encode(pixel_values)
        calls.append(1)
        return (h, cls_attn.flip(-1), kmet) if len(calls) == 1 else (h, cls_attn, kmet)

    monkeypatch.setattr(graph, "encode", first_call_moved)
    lines = check_vision(graph, path, example_inputs(graph, batch=2, seed=3))
    assert lines[0].startswith("selection on torch's own tower features: parity check failed: kept_index")
    assert any(line.startswith("hidden_states") for line in lines)  # the trunk, within tolerance


def test_two_part_check_still_refuses_a_wrong_graph(exported):
    """The fallback is no escape: the visionzip graph checked as sparsezip fails on ORT's own tower too."""
    graph, _ = exported["sparsezip"]
    with pytest.raises(ParityError, match="kept_index"):
        check_vision(graph, exported["visionzip"][1], example_inputs(graph, batch=2, seed=3))


def test_dynamic_k_is_dynamic(exported):
    graph, path = exported["sparsezip-dynamic"]
    nums = set()
    for seed in range(3):
        nums.update(run_onnx(path, example_inputs(graph, batch=2, seed=seed))["num_tokens"].tolist())
    assert len(nums) > 1, f"dynamic K gave {nums} for every image"
    assert all(1 + 16 + 12 <= n <= graph.num_slots for n in nums)


def test_none_equals_transformers_get_image_features(tiny, exported):
    graph, path = exported["none"]
    feeds = example_inputs(graph, batch=2, seed=3)
    with torch.no_grad():
        out = tiny.model.model.get_image_features(pixel_values=feeds["pixel_values"])
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    expected = torch.stack(list(features)).numpy()
    np.testing.assert_allclose(torch_outputs(graph, feeds)[0], expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(run_onnx(path, feeds)["visual_tokens"], expected, atol=TOKEN_ATOL, rtol=1e-4)
    np.testing.assert_array_equal(run_onnx(path, feeds)["kept_index"][0], np.arange(576))


def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


@pytest.mark.parametrize("name", list(METHODS))
def test_graph_rules(exported, name):
    graph, path = exported[name]
    model = onnx.load(str(path))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "only standard ONNX-domain ops"
    assert not model.functions
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    constants = _constant_values(model)
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    assert bool(topk) == (name != "none")
    for node in topk:
        assert node.input[1] in constants, "TopK's K must be a constant"
        # visionzip: dominant - 1; sparsezip: k_max. Either way S - contextual - 1. The forward
        # text form adds one more: its candidates.
        allowed = {graph.num_slots - graph.method.contextual - 1}
        if graph.text_aware and graph.method.text_form == "forward":
            allowed.add(graph.method.candidates)
        assert int(constants[node.input[1]].reshape(-1)[0]) in allowed
    outputs = {o.name: o for o in model.graph.output}
    for out in ("visual_tokens", "kept_index"):
        dims = outputs[out].type.tensor_type.shape.dim
        assert dims[1].dim_value == graph.num_slots, f"{out}: S must be static"
        assert dims[0].dim_param, f"{out}: batch must be dynamic"
    inputs = {i.name for i in model.graph.input}
    assert inputs == ({"pixel_values", "text_embeds", "text_mask"} if graph.text_aware else {"pixel_values"})


def _planted_image(graph, region):
    """Noise with one faint flat square over the patches in `region` (row, col slices).

    Faint on a busy background, so that without a prompt the square is not
    what the image-only scores pick first.
    """
    px = graph.patch_size
    pixels = torch.randn(1, 3, graph.image_size, graph.image_size, generator=torch.Generator().manual_seed(0))
    rows, cols = region
    pixels[:, 0, rows.start * px:rows.stop * px, cols.start * px:cols.stop * px] = 0.5
    pixels[:, 1, rows.start * px:rows.stop * px, cols.start * px:cols.stop * px] = -0.375
    return pixels


def test_prompt_aligned_with_planted_content_pulls_selection_towards_it(exported):
    graph, path = exported["sparsezip-text"]
    grid = graph.image_size // graph.patch_size
    region = (slice(15, 20), slice(3, 8))
    planted = {r * grid + c for r in range(region[0].start, region[0].stop)
               for c in range(region[1].start, region[1].stop)}
    pixels = _planted_image(graph, region)
    with torch.no_grad():
        h = graph.encode(pixels)[0][0, 1:]
        # A text embedding whose image under W1^T W2^T points at the planted patches' features.
        target = h[sorted(planted)].mean(0) - h.mean(0)
        mapping = graph.projector.linear_2.weight @ graph.projector.linear_1.weight  # e -> e~ is e @ mapping
        e = torch.linalg.lstsq(mapping.T, target.unsqueeze(-1)).solution.squeeze(-1)
        e = e * (8.0 / (e @ mapping).norm())
    text = e.reshape(1, 1, -1).expand(1, 4, -1).contiguous()
    with_prompt = run_onnx(path, {"pixel_values": pixels, "text_embeds": text,
                                  "text_mask": torch.ones(1, 4, dtype=torch.int64)})
    no_prompt = run_onnx(path, {"pixel_values": pixels, "text_embeds": text,
                                "text_mask": torch.zeros(1, 4, dtype=torch.int64)})
    hits_with = len(planted & set(with_prompt["kept_index"][0].tolist()))
    hits_without = len(planted & set(no_prompt["kept_index"][0].tolist()))
    assert hits_without < len(planted) // 2, "the square is salient without a prompt: the test shows nothing"
    assert hits_with > hits_without + len(planted) // 4, (hits_with, hits_without)


def test_without_text_term_the_prompt_has_no_effect(tiny):
    graph = VisionGraph(tiny.model, SparseZipConfig(beta=0.0)).eval()
    assert not graph.text_aware and set(graph.io().inputs) == {"pixel_values"}
    pixels = example_inputs(graph, batch=1)["pixel_values"]
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1, 5, graph.out_width, generator=g) for _ in range(2))
    mask = torch.ones(1, 5, dtype=torch.int64)
    out_a, out_b = torch_outputs(graph, dict(pixel_values=pixels, text_embeds=a, text_mask=mask)), \
        torch_outputs(graph, dict(pixel_values=pixels, text_embeds=b, text_mask=mask))
    for x, y in zip(out_a, out_b):
        np.testing.assert_array_equal(x, y)
