"""FactoredPointDecoder (ao's decoder) against PointDecoder (sam2's modules, the reference), on
the same weights and image features: the same logits and IoU predictions to float rounding."""

import copy

import pytest
import torch
from sam2.modeling.sam2_base import NO_OBJ_SCORE

from sam2serve import model
from sam2serve.checkpoints import load_model
from sam2serve.model import FactoredPointDecoder, ImageEncoder, PointDecoder, default_prompts_per_step, split_features

from .conftest import features_and_points


@pytest.fixture(scope="module")
def trained_micro(trained_micro_checkpoint):
    return load_model(trained_micro_checkpoint, "micro", "cpu").model


@pytest.mark.parametrize("multimask_output", [True, False])
@pytest.mark.parametrize("prompts_per_step", [None, 1, 4])
def test_factored_equals_reference_on_trained_model(trained_micro, multimask_output, prompts_per_step):
    inputs = features_and_points(trained_micro, n_points=10)  # 10: the last step is short
    with torch.inference_mode():
        expected_logits, expected_ious = PointDecoder(trained_micro, multimask_output)(*inputs)
        logits, ious = FactoredPointDecoder(trained_micro, multimask_output, prompts_per_step)(*inputs)
    assert logits.shape == expected_logits.shape == (10, 3 if multimask_output else 1, 64, 64)
    largest = float(expected_logits.abs().max())
    assert largest > 5  # trained: confident logits, not a flat random field
    torch.testing.assert_close(ious, expected_ious, rtol=0, atol=1e-5)
    # Float rounding grows with the logits' scale (the micro model's are calibrated to tens).
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5 * largest)


@pytest.mark.parametrize("multimask_output", [True, False])
def test_factored_equals_reference_on_tiny_at_1024_pixels(tiny_model, multimask_output):
    """The official architecture and input size (random weights)."""
    inputs = features_and_points(tiny_model, n_points=5)
    with torch.inference_mode():
        expected_logits, expected_ious = PointDecoder(tiny_model, multimask_output)(*inputs)
        logits, ious = FactoredPointDecoder(tiny_model, multimask_output, prompts_per_step=2)(*inputs)
    assert logits.shape == expected_logits.shape == (5, 3 if multimask_output else 1, 256, 256)
    torch.testing.assert_close(ious, expected_ious, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)


def test_iou_gate_skips_only_prompts_whose_every_mask_fails(trained_micro):
    inputs = features_and_points(trained_micro, n_points=24, seed=1)
    with torch.inference_mode():
        expected_logits, expected_ious = PointDecoder(trained_micro, True)(*inputs)
        # About half the prompts pass: halfway between two prompts' best IoUs, far from both.
        best = expected_ious.max(dim=1).values.sort().values
        gate = float(best[11] + best[12]) / 2
        logits, ious = FactoredPointDecoder(trained_micro, True, prompts_per_step=4, iou_gate=gate)(*inputs)
    passing = (expected_ious > gate).any(dim=1)
    assert 0 < passing.sum() < len(passing)
    torch.testing.assert_close(ious, expected_ious, rtol=0, atol=1e-5)
    largest = float(expected_logits.abs().max())
    torch.testing.assert_close(logits[passing], expected_logits[passing], rtol=0, atol=1e-5 * largest)
    assert (logits[~passing] == NO_OBJ_SCORE).all()


def test_iou_gate_needs_multimask_output(trained_micro):
    with pytest.raises(ValueError, match="multimask"):
        FactoredPointDecoder(trained_micro, multimask_output=False, iou_gate=0.8)


def test_cpu_steps_hold_the_same_bytes_in_every_dtype(trained_micro):
    """Steps are sized to stay in cache: a bfloat16 model's steps take twice the prompts."""
    half = copy.deepcopy(trained_micro).to(torch.bfloat16)
    steps = default_prompts_per_step(trained_micro), default_prompts_per_step(half)
    assert steps[1] == 2 * steps[0]


def traced_operations(function, *inputs) -> set[str]:
    """The names of the operations torch.compile traces in function(*inputs)."""
    names = set()

    def backend(graph_module, example_inputs):
        names.update(getattr(node.target, "__name__", str(node.target))
                     for node in graph_module.graph.nodes if node.op in ("call_function", "call_method"))
        return graph_module.forward

    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(function, backend=backend, fullgraph=True, dynamic=False)(*inputs)
    torch._dynamo.reset()
    return names


@pytest.mark.parametrize("start_shape, b_shape", [((24, 5), (3, 5)), ((4, 24, 1), (4, 3, 5)), ((4, 24, 5), (4, 3, 5))])
def test_product_plus_gives_the_same_sums_compiled_and_eager(start_shape, b_shape, monkeypatch):
    """One baddbmm, or compiled in the GPU's fusion forms a product and an add: the same function
    (shared (k, n) weights, a start broadcast along a row, one of the product's own shape)."""
    torch.manual_seed(0)
    start, a, b = torch.randn(start_shape), torch.randn(4, 24, 3), torch.randn(b_shape)
    expected = start + torch.matmul(a, b)
    assert "baddbmm" in traced_operations(model.product_plus, start, a, b)  # on a CPU, the eager form
    monkeypatch.setattr(model, "FUSION_FORMS_WHEN_COMPILED", {"cuda", "cpu"})  # the GPU's forms, here
    assert "baddbmm" not in traced_operations(model.product_plus, start, a, b)
    torch.testing.assert_close(model.product_plus(start, a, b), expected)  # eager: the same sum
    torch.testing.assert_close(torch.compile(model.product_plus, fullgraph=True)(start, a, b), expected)


def test_decoder_compiled_in_the_gpus_forms_equals_the_reference(trained_micro, monkeypatch):
    """The factored decoder compiled in the GPU's fusion forms (sums after products, the masks'
    read-out as a reduction) gives sam2's results."""
    inputs = features_and_points(trained_micro, n_points=10)
    decoder = FactoredPointDecoder(trained_micro, True)
    eager_forms = traced_operations(decoder, *inputs)
    monkeypatch.setattr(model, "FUSION_FORMS_WHEN_COMPILED", {"cuda", "cpu"})
    fusion_forms = traced_operations(decoder, *inputs)
    assert {"baddbmm", "baddbmm_"} <= eager_forms and not {"baddbmm", "baddbmm_"} & fusion_forms
    assert "sum" in fusion_forms - eager_forms  # the masks' read-out, a reduction
    torch._dynamo.reset()  # nothing compiled earlier in the CPU's forms is reused
    compiled = torch.compile(decoder, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        expected_logits, expected_ious = PointDecoder(trained_micro, True)(*inputs)
        logits, ious = compiled(*inputs)
    torch._dynamo.reset()
    torch.testing.assert_close(ious, expected_ious, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5 * float(expected_logits.abs().max()))


def test_positional_embedding_is_computed_once_not_per_call(trained_micro, monkeypatch):
    """Its sines and cosines stay out of every call (compiled, they were fused into the kernels
    over every prompt's image tokens): the decoder holds the embedding sam2 computes."""
    decoder = FactoredPointDecoder(trained_micro, True)
    torch.testing.assert_close(decoder.dense_pe, trained_micro.sam_prompt_encoder.get_dense_pe()[0].flatten(1).t(),
                               rtol=0, atol=0)
    monkeypatch.setattr(trained_micro.sam_prompt_encoder, "get_dense_pe", lambda: pytest.fail("computed in a call"))
    with torch.inference_mode():
        logits, _ = decoder(*features_and_points(trained_micro, n_points=3))
    assert logits.shape == (3, 3, 64, 64)


def test_cpu_steps_are_four_prompts_of_a_1024_pixel_float32_model(tiny_model, trained_micro):
    """A step's image tokens fit the cache (CPU_STEP_BYTES): 4 prompts of 64x64 float32 tokens,
    64 of the micro model's 16x16."""
    assert default_prompts_per_step(tiny_model) == 4
    assert default_prompts_per_step(trained_micro) == 64


def test_single_mask_output_picks_by_stability_as_the_official_models_do(trained_micro, monkeypatch):
    """The official SAM2.1 configs pick a single mask by stability (dynamic_multimask_via_stability;
    the micro model's config does not): where the first mask is unstable, the most confident of
    the other three, as sam2's decoder picks it."""
    decoder = trained_micro.sam_mask_decoder
    inputs = features_and_points(trained_micro, n_points=24, seed=1)
    with torch.inference_mode():
        first_logits, _ = PointDecoder(trained_micro, False)(*inputs)
        monkeypatch.setattr(decoder, "dynamic_multimask_via_stability", True)
        expected_logits, expected_ious = PointDecoder(trained_micro, False)(*inputs)
        logits, ious = FactoredPointDecoder(trained_micro, False, prompts_per_step=4)(*inputs)
    assert (expected_logits != first_logits).flatten(1).any(dim=1).sum() >= 1  # some prompts took another mask
    largest = float(expected_logits.abs().max())
    torch.testing.assert_close(ious, expected_ious, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5 * largest)


def test_an_images_features_count_all_three_levels_in_bytes(trained_micro):
    """What the embedding cache counts against --embedding-cache-mb: the image embedding and both
    high-resolution levels (on the micro model half a MiB per image, 3/4 of it high-resolution)."""
    with torch.inference_mode():
        features = split_features(ImageEncoder(trained_micro)(torch.zeros(2, 3, trained_micro.image_size,
                                                                          trained_micro.image_size)))
    assert len(features) == 2
    assert [f.nbytes for f in features] == [(128 * 16 * 16 + 16 * 64 * 64 + 32 * 32 * 32) * 4] * 2 == [2**19] * 2


def test_factored_decoder_gives_sam2s_gradients_where_they_are_recorded(trained_micro):
    """Outside inference mode, with gradients recorded, the image tokens are not updated in place
    (autograd needs them): the weights' gradients are those of sam2's decoder."""
    inputs = features_and_points(trained_micro, n_points=3)
    inputs = [tensor.clone() for tensor in inputs]  # made in inference mode: plain tensors here

    def gradient(decoder) -> torch.Tensor:
        trained_micro.zero_grad()
        logits, ious = decoder(*inputs)
        (logits.sum() + ious.sum()).backward()
        return trained_micro.sam_mask_decoder.output_upscaling[0].weight.grad.clone()

    expected = gradient(PointDecoder(trained_micro, True))
    got = gradient(FactoredPointDecoder(trained_micro, True, prompts_per_step=2))
    trained_micro.zero_grad(set_to_none=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
