"""Interactive segmentation (/embed, /segment) against sam2's own SAM2ImagePredictor.predict.

Exactness on the trained micro model and on a random tiny checkpoint: single point, several
points with a background one, box, box and point, refinement from a previous mask's logits,
and many prompt sets batched in one decoder call. Then the HTTP endpoints in process: ids,
the cache (hits, misses, evictions, one encoding for concurrent requests), one-shot multipart
requests, and a 400 naming the field for each kind of bad prompt.
"""

import copy
import dataclasses
import io
import json
import re
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.build_sam import build_sam2
from prometheus_client.parser import text_string_to_metric_families

from sam2serve.amg import AMGConfig, MaskGenerator, eager_kernels, image_predictor
from sam2serve.checkpoints import load_model, model_size
from sam2serve.interactive import (
    MAX_POINTS, MAX_PROMPT_SETS, CacheStats, EmbeddingCache, PromptSegmenter, UnknownId, parse_prompts,
)
from sam2serve import protocol
from sam2serve.rle import masks_to_rle_vectorized, rles_to_masks
from sam2serve.serving import create_app
from sam2serve.worker import InferenceWorker

from .conftest import make_scene
from .test_worker import wait_for

IMAGE = make_scene(150, 200, seed=11)
# (name, prompt as the API takes it): points are [x, y] in image pixels.
PROMPTS = [
    ("one point", {"points": [[60, 70]], "labels": [1]}),
    ("one point, one mask", {"points": [[100, 50]], "labels": [1], "multimask": False}),
    ("one background point", {"points": [[100, 50]], "labels": [0]}),
    ("points with a background one", {"points": [[60, 70], [150, 40]], "labels": [1, 0]}),
    ("box", {"box": [20, 30, 120, 110]}),
    ("box and point", {"box": [20, 30, 120, 110], "points": [[60, 70]], "labels": [1]}),
]
# One mask asked for where the decoder's single-mask output is unstable (on the trained micro
# model): sam2's default build answers another of its masks; segment-everything's does not.
UNSTABLE_PROMPTS = [
    ("box, single mask unstable", {"box": [100, 40, 190, 140]}),
    ("one point, one mask, unstable", {"points": [[140, 35]], "labels": [1], "multimask": False}),
]


def reference_answer(predictor, prompt: dict, mask_input=None):
    """sam2's predictor on the same prompt, masks sorted best first as the API answers."""
    points = np.array(prompt["points"], dtype=np.float32) if "points" in prompt else None
    labels = np.array(prompt["labels"]) if "points" in prompt else None
    box = np.array(prompt["box"], dtype=np.float32) if "box" in prompt else None
    multimask = prompt.get("multimask", "points" in prompt and len(prompt["points"]) == 1 and "box" not in prompt)
    masks, ious, logits = predictor.predict(points, labels, box, mask_input, multimask_output=multimask)
    order = np.argsort(-ious, kind="stable")
    return masks[order] > 0, ious[order], logits[order]


def assert_same(ours, reference, name):
    masks, ious, logits = reference
    assert ours.masks.shape == masks.shape, name
    differing = (ours.masks.cpu().numpy() != masks).mean()
    assert differing <= 1e-4, f"{name}: {differing:.2%} of pixels differ"
    np.testing.assert_allclose(ours.iou_predictions.cpu().numpy(), ious, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(ours.low_res_logits.cpu().numpy(), logits, atol=1e-4, err_msg=name)


@pytest.fixture(scope="module", params=["micro", "tiny"])
def checkpoint(request, trained_micro_checkpoint, tiny_checkpoint_dir):
    if request.param == "micro":
        return trained_micro_checkpoint, "micro"
    return tiny_checkpoint_dir / "sam2.1_hiera_tiny.pt", "tiny"


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(*checkpoint, "cpu").model


def test_prompts_equal_sam2s_predictor(model, checkpoint):
    """Against SAM2ImagePredictor on the model as sam2 builds it by default (build_sam2), as its
    users and demos run it."""
    segmenter = PromptSegmenter(model, "test")
    embedding = segmenter.embed(IMAGE)
    path, model_type = checkpoint
    size = model_size(model_type)
    predictor = image_predictor(build_sam2(size.config, str(path), "cpu", hydra_overrides_extra=list(size.overrides)))
    predictor.set_image(IMAGE)
    prompts = parse_prompts([prompt for _, prompt in PROMPTS + UNSTABLE_PROMPTS], IMAGE.shape[:2])
    one_by_one = [segmenter.segment(embedding, [prompt])[0] for prompt in prompts]
    batched = segmenter.segment(embedding, prompts + prompts[:1] * 2)  # one point three times: one batch
    for (name, prompt), ours, together in zip(PROMPTS + UNSTABLE_PROMPTS, one_by_one, batched):
        reference = reference_answer(predictor, prompt)
        assert_same(ours, reference, name)
        assert_same(together, reference, f"{name}, batched")
    for repeat in batched[len(prompts):]:
        assert_same(repeat, reference_answer(predictor, PROMPTS[0][1]), "one point, batched with itself")

    # Refinement: the best mask's logits as mask_input, with the point again.
    best_logits = one_by_one[0].low_res_logits[0]
    refine = parse_prompts([{**PROMPTS[0][1], "mask_input": "best", "multimask": False}], IMAGE.shape[:2])
    ours = segmenter.segment(embedding, refine, {"best": best_logits})[0]
    reference = reference_answer(predictor, {**PROMPTS[0][1], "multimask": False}, best_logits.numpy()[None])
    assert_same(ours, reference, "refined with mask_input")
    alone = segmenter.segment(embedding, parse_prompts([{"mask_input": "best"}], IMAGE.shape[:2]), {"best": best_logits})
    assert_same(alone[0], reference_answer(predictor, {}, best_logits.numpy()[None]), "mask_input alone")
    # Several masks alone in one request (sam2's predictor cannot batch those: each runs by itself).
    logits = {"best": best_logits, "second": one_by_one[0].low_res_logits[1]}
    several = segmenter.segment(embedding, parse_prompts([{"mask_input": "best"}, {"mask_input": "second"},
                                                          {"mask_input": "best"}], IMAGE.shape[:2]), logits)
    for answer, key in zip(several, ["best", "second", "best"]):
        assert_same(answer, reference_answer(predictor, {}, logits[key].numpy()[None]), f"mask_input {key}, together")
    assert not model.sam_mask_decoder.dynamic_multimask_via_stability  # segment-everything's setting, back


@pytest.mark.parametrize("prompts, field", [
    ("not a list", "prompts"),
    ([{"points": [[10, 10]], "labels": [1, 0]}], "prompts[0].labels"),
    ([{"points": [[10, 500]], "labels": [1]}], "prompts[0].points[0]"),
    ([{"points": [[float("nan"), 1]], "labels": [1]}], "prompts[0].points[0]"),
    ([{"points": [["1", 2]], "labels": [1]}], "prompts[0].points[0]"),
    ([{"box": [50, 10, 20, 40]}], "prompts[0].box"),
    ([{"points": [[10, 10]], "labels": [2]}], "prompts[0].labels[0]"),  # which label
    ([{"labels": []}], "prompts[0]"),
    ([{"points": [[1, 1]]}] * 65, "prompts"),
    ([{"points": [[10**400, 1]]}], "prompts[0].points[0]"),  # JSON's ints have no bound; a float's range has
    ([{"box": [0, 0, 10**400, 10]}], "prompts[0].box"),
])
def test_bad_prompts_name_the_field(prompts, field):
    with pytest.raises(ValueError, match="^" + re.escape(field) + ":"):
        parse_prompts(prompts, (100, 200))


def test_common_mistakes_are_told_what_to_write_instead():
    """A prompt set sent alone, a misspelt field, a flat point, a short box, format in the JSON
    body, a + in the query (a space once decoded), an empty file in a form (a browser's form with
    no file chosen): each message says what to write."""
    from sam2serve.preprocess import decode_image

    for call, message in [
        (lambda: parse_prompts({"points": [[1, 1]]}, (100, 200)),
         "prompts: expected a list of prompt sets, got one object: put it in a list, [{...}]"),
        (lambda: parse_prompts([{"point": [[1, 1]]}], (100, 200)),
         "prompts[0]: unknown fields 'point'; a prompt set has points, labels, box, mask_input, multimask, "
         "keep_logits"),
        (lambda: parse_prompts([{"points": [100, 80]}], (100, 200)),
         "prompts[0].points[0]: expected 2 finite numbers, [x, y]"),
        (lambda: parse_prompts([{"box": [1, 2, 3]}], (100, 200)),
         "prompts[0].box: expected 4 finite numbers, [x0, y0, x1, y1]"),
        (lambda: protocol.segment_payload({"image_id": "x", "prompts": [], "format": "coco"}),
         "unknown fields 'format'; a /segment body has ['image_id', 'prompts'] (format goes in the URL's query: "
         "/segment?format=coco)"),
        (lambda: protocol.request_settings("/upload_rle", [("pred_iou_thresh", " 0.6")]),
         "pred_iou_thresh: ' 0.6' is not a number (a + in a URL's query stands for a space: write the number "
         "without it, or + as %2B)"),
        (lambda: protocol.request_settings("/upload_rle", [("pred_iou_thresh", "1e 3")]),  # 1e+3
         "pred_iou_thresh: '1e 3' is not a number (a + in a URL's query stands for a space: write the number "
         "without it, or + as %2B)"),
        (lambda: protocol.request_settings("/upload_rle", [("pred_iou_thresh", "0.6x")]),
         "pred_iou_thresh: '0.6x' is not a number"),
        (lambda: protocol.decode_upload([b""], ["image"], protocol.Limits()),
         "the file is empty (0 bytes; from a browser's form: was a file chosen?)"),
        (lambda: decode_image(b"", 100), "the file is empty"),  # a file read from disk: no form
    ]:
        with pytest.raises(ValueError) as refused:
            call()
        assert str(refused.value) == message


def test_a_prompt_that_is_no_object_is_told_every_field_it_may_have():
    with pytest.raises(ValueError, match=re.escape("prompts[0]: expected an object with points, labels, box, "
                                                   "mask_input, multimask, keep_logits")):
        parse_prompts([[10, 20]], (100, 200))


def test_a_number_of_thousands_of_digits_is_not_repeated_whole():
    with pytest.raises(ValueError, match=re.escape("prompts[0].points[0]: (10000000000000000000..., 1) is outside")):
        parse_prompts([{"points": [[10**4000, 1]]}], (100, 200))


def test_a_field_given_as_null_is_a_field_left_out():
    given = [{"points": [[10, 20]], "labels": None, "box": None, "mask_input": None, "multimask": None,
              "keep_logits": None},
             {"points": None, "box": [5, 5, 50, 40], "multimask": None}]
    left_out = [{"points": [[10, 20]]}, {"box": [5, 5, 50, 40]}]
    assert ([p.canonical() for p in parse_prompts(given, (100, 200))]
            == [p.canonical() for p in parse_prompts(left_out, (100, 200))])
    assert parse_prompts(given, (100, 200))[0].multimask  # the default of one point alone
    with pytest.raises(ValueError, match=re.escape("prompts[0]: give points, a box or a mask_input (or several of them)")):
        parse_prompts([{"points": None, "box": None}], (100, 200))


def test_cache_keeps_the_most_recent_within_its_bytes():
    cache = EmbeddingCache(max_bytes=100)
    for key in "abc":
        cache.put(key, key.upper(), 40)
    assert cache.stats().evictions == 1 and cache.stats().bytes == 80
    with pytest.raises(UnknownId):
        cache.get("a")
    assert cache.get("b") == "B"
    cache.put("d", "D", 40)  # "c" is now the least recently used
    with pytest.raises(UnknownId):
        cache.get("c")
    cache.put("e", "E", 40, keep="b")  # "b" is the oldest, but kept: "d" goes
    assert cache.get("b") == "B" and cache.get("e") == "E"
    with pytest.raises(UnknownId):
        cache.get("d")
    disabled = EmbeddingCache(max_bytes=0)
    assert disabled.get_or_compute("x", lambda: 1, lambda value: 8) == 1
    with pytest.raises(UnknownId):
        disabled.get("x")


def test_spares_use_the_room_entries_leave_and_never_evict_one():
    cache = EmbeddingCache(max_bytes=100)
    cache.put("a", "A", 40)
    for key in "xyz":  # each evicts the spares before it, the oldest first, as room requires
        cache.put_spare(key, key.upper(), 30)
    assert [cache.holds(key) for key in "axyz"] == [True, False, True, True]
    assert cache.stats() == CacheStats(hits=0, misses=0, evictions=0, bytes=100, entries=1, spares=2)
    assert cache.room_for_spares() == 60
    cache.put_spare("w", "W", 70)  # more than the entries leave: not kept, nothing evicted
    assert not cache.holds("w") and cache.holds("y") and cache.stats().spares == 2
    cache.put("b", "B", 40)  # an entry evicts spares first
    assert [cache.holds(key) for key in "abyz"] == [True, True, False, False] and cache.stats().bytes == 80
    cache.put_spare("v", "V", 20)
    assert cache.get("v") == "V"  # asked for: an entry, the most recent
    cache.put("c", "C", 40)  # the least recently used entry goes: "a"
    assert [cache.holds(key) for key in "abcv"] == [False, True, True, True]
    cache.put_spare("b", "other", 10)  # already cached: left as it is
    assert cache.get("b") == "B"
    assert cache.stats() == CacheStats(hits=2, misses=0, evictions=1, bytes=100, entries=3, spares=0)
    again = EmbeddingCache(max_bytes=100)
    again.put_spare("s", "S", 30)
    again.put("s", "new", 10)  # a spare put again as an entry: counted once
    assert again.stats() == CacheStats(hits=0, misses=0, evictions=0, bytes=10, entries=1, spares=0)
    again.put_spare("t", "T", 30)
    assert again.get_or_compute("t", lambda: "computed", lambda value: 5) == "T"  # a spare is found, not computed
    assert again.get("s") == "new"
    assert again.stats() == CacheStats(hits=2, misses=0, evictions=0, bytes=40, entries=2, spares=0)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def micro(trained_micro_checkpoint):
    return load_model(trained_micro_checkpoint, "micro", "cpu").model


def micro_client(micro, cache_bytes=2**30):
    worker = InferenceWorker(max_queue=8, timeout_s=120)
    worker.start(MaskGenerator(micro, AMGConfig(points_per_side=4)), PromptSegmenter(micro, "micro"))
    return create_app(worker, cache=EmbeddingCache(cache_bytes), info={"mode": "ao"}).test_client()


def cache_metrics(client) -> dict[str, float]:
    text = client.get("/metrics").get_data(as_text=True)
    return {sample.name.removeprefix("sam2_embedding_cache_"): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith("sam2_embedding_cache_")}


def test_requests_for_an_image_being_encoded_take_places_in_the_queue(micro):
    """The HTTP server has threads for the worker's queue and a few more: requests waiting for
    an encoding under way must count in that queue (503 when it is full), or identical /embed
    requests, each holding a thread, starve /health of threads."""
    worker = InferenceWorker(max_queue=2, timeout_s=120)
    worker.start(MaskGenerator(micro, AMGConfig(points_per_side=4)), PromptSegmenter(micro, "micro"))
    client = create_app(worker, cache=EmbeddingCache(2**30), info={"mode": "ao"}).test_client()
    gate = threading.Event()
    busy = threading.Thread(target=worker.call, args=(gate.wait,), daemon=True)  # the model's thread, held
    busy.start()
    wait_for(lambda: worker.queue_depth == 0 and busy.is_alive())
    data, answers = png(IMAGE), []

    def embed():
        response = client.post("/embed", data={"image": (io.BytesIO(data), "a.png")})
        answers.append((response.status_code, response.get_json()))

    threads = [threading.Thread(target=embed, daemon=True) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(answers) == 2)  # beyond the queue's two places: answered at once
        assert [status for status, _ in answers] == [503, 503]
    finally:
        gate.set()
        for thread in threads + [busy]:
            thread.join(timeout=60)
    assert sorted(status for status, _ in answers) == [200, 200, 503, 503]
    worker.stop()
    assert len({answer["image_id"] for status, answer in answers if status == 200}) == 1
    metrics = cache_metrics(client)
    assert metrics["misses_total"] == 1 and metrics["hits_total"] == 1  # one encoding, found by the other


def test_one_shot_segment_waits_one_request_timeout_for_both_its_calls(micro):
    """An uploaded image's /segment encodes, then decodes: two calls on the model, which
    together may wait no longer than the request timeout (each had a timeout of its own)."""
    class Slow(PromptSegmenter):
        def embed(self, image):
            time.sleep(0.6)
            return super().embed(image)

        def segment(self, *args, **kwargs):
            time.sleep(0.6)
            try:
                return super().segment(*args, **kwargs)
            finally:
                decoded.set()

    decoded = threading.Event()  # the request gave up; the model's thread still decodes

    worker = InferenceWorker(max_queue=4, timeout_s=1.0)
    worker.start(MaskGenerator(micro, AMGConfig(points_per_side=4)), Slow(micro, "micro"))
    client = create_app(worker, cache=EmbeddingCache(2**30), info={"mode": "ao"}).test_client()
    try:
        response = client.post("/segment", data={"image": (io.BytesIO(png(IMAGE)), "a.png"),
                                                 "prompts": json.dumps([PROMPTS[0][1]])})
    finally:
        worker.stop()
        decoded.wait(timeout=60)  # not torch still running on it when the tests' process exits
    assert response.status_code == 504 and "request timeout of 1 s" in response.get_json()["error"]


def test_the_worker_times_each_kind_of_work_for_retry_after(micro):
    """Encodings, prompt decodes, images and whole requests are timed by their kinds: the
    worker's Retry-After adds up the work ahead by them (test_worker.py)."""
    worker = InferenceWorker(max_queue=8, timeout_s=120)
    worker.start(MaskGenerator(micro, AMGConfig(points_per_side=4)), PromptSegmenter(micro, "micro"))
    client = create_app(worker, info={"mode": "ao"}).test_client()
    one_shot = client.post("/segment", data={"image": (io.BytesIO(png(IMAGE)), "a.png"),
                                             "prompts": json.dumps([PROMPTS[0][1]])})
    masks = client.post("/upload_rle", data={"image": (io.BytesIO(png(IMAGE)), "a.png")})
    assert one_shot.status_code == masks.status_code == 200
    assert set(worker.job_seconds.seconds) == {"encode", "decode", "image"}
    assert set(worker.request_seconds.seconds) == {"/segment", "/upload_rle"}


def test_embed_then_segment_over_http(micro):
    client = micro_client(micro)
    data = png(IMAGE)
    # Concurrent requests for one image: one encoding.
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(
        client.post("/embed", data={"image": (io.BytesIO(data), "a.png")}).get_json()), daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({answer["image_id"] for answer in answers}) == 1 and answers[0]["size"] == [150, 200]
    metrics = cache_metrics(client)
    assert metrics["misses_total"] == 1 and metrics["hits_total"] == 3 and metrics["entries"] == 1
    image_id = answers[0]["image_id"]

    prompts = [{**prompt, "keep_logits": True} for _, prompt in PROMPTS]
    answer = client.post("/segment", json={"image_id": image_id, "prompts": prompts}).get_json()
    segmenter = PromptSegmenter(micro, "micro")
    direct = segmenter.segment(segmenter.embed(IMAGE), parse_prompts(prompts, (150, 200)))
    assert len(answer["results"]) == len(PROMPTS)
    for result, expected in zip(answer["results"], direct):
        assert np.array_equal(rles_to_masks(result["masks"]), expected.masks.numpy())
        assert result["iou_predictions"] == expected.iou_predictions.tolist()
        assert result["iou_predictions"] == sorted(result["iou_predictions"], reverse=True)

    # One-shot multipart gives the same answer; refinement from a kept mask works.
    one_shot = client.post("/segment", data={"image": (io.BytesIO(data), "a.png"), "prompts": json.dumps(prompts)})
    assert one_shot.get_json() == answer
    # A prompts file that starts with a byte-order mark (as some Windows editors write JSON), read
    # into the field by curl -F 'prompts=<file': taken as a JSON body with one is.
    with_bom = client.post("/segment", data={"image": (io.BytesIO(data), "a.png"),
                                             "prompts": "\ufeff" + json.dumps(prompts)})
    assert with_bom.get_json() == answer
    refine = {"points": [[60, 70]], "labels": [1], "mask_input": answer["results"][0]["mask_input_ids"][0],
              "multimask": False}
    refined = client.post("/segment", json={"image_id": image_id, "prompts": [refine]})
    assert refined.status_code == 200 and len(refined.get_json()["results"][0]["masks"]) == 1
    alone = client.post("/segment", json={"image_id": image_id, "prompts": [{"mask_input": refine["mask_input"]}]})
    assert alone.status_code == 200 and len(alone.get_json()["results"][0]["masks"]) == 1

    for body, status, words in [
        ({"image_id": "f" * 32, "prompts": prompts}, 404, "/embed again"),
        ({"image_id": image_id, "prompts": [{**refine, "mask_input": "gone"}]}, 404, "unknown mask_input"),
        ({"image_id": image_id, "prompts": [{"points": [[500, 1]], "labels": [1]}]}, 400, "prompts[0].points[0]"),
        ({"prompts": prompts}, 400, "image_id"),
        ({"image_id": image_id, "prompts": prompts, "promts": []}, 400, "unknown fields 'promts'; a /segment body"),
        # A client's names are repeated cut short, the first ten of them.
        ({"image_id": image_id, "prompts": prompts, **{f"{i}" * 10_000: 1 for i in range(12)}}, 400,
         "'" + "6" * 40 + "...', '" + "7" * 40 + "...' and 2 more; a /segment body"),
    ]:
        response = client.post("/segment", json=body)
        assert response.status_code == status and words in response.get_json()["error"], body
    malformed = client.post("/segment", data="{not json", content_type="application/json")
    assert malformed.status_code == 400 and "JSON" in malformed.get_json()["error"]
    # JSON sent without its Content-Type (curl -d alone sends a URL-encoded form): told what to send.
    unlabelled = client.post("/segment", data=json.dumps({"image_id": image_id, "prompts": prompts}),
                             content_type="application/x-www-form-urlencoded")
    error = unlabelled.get_json()["error"]
    assert unlabelled.status_code == 400 and "Content-Type: application/json" in error, error


def test_segment_everything_encodes_as_sam2s_predictor_bit_for_bit(model):
    """What lets an /embed use segment-everything's encoding (protocol.share_encodings)."""
    generator, segmenter = MaskGenerator(model, AMGConfig()), PromptSegmenter(model, "test")
    assert generator.encodes_as_sam2
    ours = segmenter.embedding_of(IMAGE, generator.embed(IMAGE))
    theirs = segmenter.embed(IMAGE)
    assert theirs.features["image_embed"].is_inference()  # no autograd bookkeeping on /embed
    assert ours.size == theirs.size == (150, 200) and ours.nbytes == theirs.nbytes
    for level, (mine, sam2s) in enumerate(zip([ours.features["image_embed"], *ours.features["high_res_feats"]],
                                              [theirs.features["image_embed"], *theirs.features["high_res_feats"]])):
        assert torch.equal(mine, sam2s), level
    half = copy.deepcopy(model).to(torch.bfloat16)
    half.sam_prompt_encoder.float()  # as fast_furious keeps it (sam2's positional encoding in float32)
    assert not MaskGenerator(half, AMGConfig()).encodes_as_sam2
    compiled_like = MaskGenerator(model, AMGConfig(), eager_kernels(model, AMGConfig()))  # kernels given: not known
    assert not compiled_like.encodes_as_sam2
    assert not protocol.share_encodings(compiled_like, segmenter, EmbeddingCache(2**30))


def test_an_image_segmented_everything_in_is_embedded_without_encoding_again(micro):
    """The web page asks /embed for the image whose masks it has just shown."""
    worker = InferenceWorker(max_queue=8, timeout_s=120)
    generator, segmenter, cache = MaskGenerator(micro, AMGConfig(points_per_side=4)), PromptSegmenter(micro, "micro"), EmbeddingCache(2**30)
    assert protocol.share_encodings(generator, segmenter, cache)
    encodings = []
    segmenter.embed = lambda image: encodings.append(image) or PromptSegmenter.embed(segmenter, image)
    worker.start(generator, segmenter)
    client = create_app(worker, cache=cache, info={"mode": "ao"}).test_client()
    other = png(make_scene(150, 200, seed=12))
    for data in (png(IMAGE), other):
        masks = client.post("/upload_rle", data={"image": (io.BytesIO(data), "a.png")})
        assert masks.status_code == 200 and masks.get_json() == {
            f"mask_{i}": rle for i, rle in enumerate(MaskGenerator(micro, AMGConfig(points_per_side=4)).generate(
                np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))))}
    embedded = client.post("/embed", data={"image": (io.BytesIO(png(IMAGE)), "a.png")})
    assert embedded.status_code == 200 and encodings == []
    metrics = cache_metrics(client)
    assert metrics["misses_total"] == 0 and metrics["hits_total"] == 1 and metrics["entries"] == 1
    assert metrics["spares"] == 1
    prompts = [prompt for _, prompt in PROMPTS]
    answer = client.post("/segment", json={"image_id": embedded.get_json()["image_id"], "prompts": prompts})
    direct = segmenter.segment(PromptSegmenter.embed(segmenter, IMAGE), parse_prompts(prompts, (150, 200)))
    for result, expected in zip(answer.get_json()["results"], direct):
        assert np.array_equal(rles_to_masks(result["masks"]), expected.masks.numpy())
        assert result["iou_predictions"] == expected.iou_predictions.tolist()
    # Only an image encoded alone is kept (in a batch, other kernels may give other last bits).
    assert cache.stats().spares == 1 and cache.stats().entries == 1  # the other image, not asked for
    generator.annotate_batch([make_scene(150, 200, seed=13), make_scene(150, 200, seed=14)])
    assert cache.stats().spares == 1
    generator.annotate_batch([make_scene(150, 200, seed=13)])
    assert cache.stats().spares == 2
    # Out of memory: the spares go first (kept only in case they are asked for); the entry stays.
    entry_bytes = sum(size for _, size in cache.entries.values())

    def out_of_memory(images):
        raise torch.OutOfMemoryError("out of memory")

    generator.generate_batch = out_of_memory
    failed = client.post("/upload_rle", data={"image": (io.BytesIO(other), "a.png")})
    assert failed.status_code == 500 and "out of memory" in failed.get_json()["error"]
    stats = cache.stats()
    assert (stats.bytes, stats.entries, stats.spares, stats.evictions) == (entry_bytes, 1, 0, 0)


def test_ids_bodies_and_forms_of_the_wrong_kind_get_4xx(micro):
    """What a client can get wrong answers 400, 404 or 413 with a message, never 500, and costs no
    encoding: ids of one kind used as the other, a mask's id on another image, JSON nested too
    deeply or too long, a form's unknown or repeated fields, an id too long to repeat in full."""
    client = micro_client(micro)
    ids = [client.post("/embed", data={"image": (io.BytesIO(png(make_scene(150, 200, seed=s))), "a.png")})
           .get_json()["image_id"] for s in (1, 2)]
    point = {"points": [[60, 70]], "labels": [1]}
    kept = client.post("/segment", json={"image_id": ids[0], "prompts": [{**point, "keep_logits": True}]})
    mask_input = kept.get_json()["results"][0]["mask_input_ids"][0]
    deep = "[" * 100_000 + "]" * 100_000
    for body, status, words in [
        ({"image_id": ids[0], "prompts": [point, {**point, "mask_input": ids[0]}]}, 404,
         "prompts[1].mask_input: unknown mask_input"),
        ({"image_id": mask_input, "prompts": [point]}, 404, "unknown image_id"),
        ({"image_id": ids[0], "prompts": [point, {"points": [[1, 1], [2, 2]], "labels": [1, 2]}]}, 400,
         "prompts[1].labels[1]: each label is 1 (foreground) or 0 (background)"),
        # A name given twice: json.loads kept the last, and the first (outside the image here) went unread.
        ('{"image_id": "%s", "prompts": [{"points": [[9999, 1]], "points": [[60, 70]]}]}' % ids[0], 400,
         "the body: 'points' is given twice in one object; give it once"),
        ('{"image_id": "nope", "image_id": "%s", "prompts": []}' % ids[0], 400, "the body: 'image_id' is given twice"),
        ({"image_id": ids[1], "prompts": [{**point, "mask_input": mask_input}]}, 404, "on this image"),
        (deep, 400, "nested too deeply"),
        ("{not json", 400, "not valid JSON: Expecting property name"),
        ("", 400, "the body is empty"),
        # curl -F with the JSON example's -H 'Content-Type: application/json': not JSON, and why.
        ('--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\xff\r\n--b--\r\n', 400,
         "the body is a multipart form, but its Content-Type is not multipart/form-data: send the form as such"),
        # More digits than Python converts: the field named, not Python's advice (sys.set_int_max_str_digits).
        ('{"image_id": "%s", "prompts": [{"points": [[1%s, 1]]}]}' % (ids[0], "0" * 5000), 400,
         "prompts[0].points[0]: expected 2 finite numbers"),
        # Valid, but over a form field's limit: not parsed (prompts sent in a form have the same limit).
        (json.dumps({"image_id": ids[0], "prompts": [point]}) + " " * 500_000, 413,
         "the JSON body is larger than the limit of 500000 bytes"),
    ]:
        data = body if isinstance(body, str) else json.dumps(body)
        response = client.post("/segment", data=data, content_type="application/json")
        assert response.status_code == status and words in response.get_json()["error"], (str(body)[:80], response.get_json())
    refined = client.post("/segment", json={"image_id": ids[0], "prompts": [{**point, "mask_input": mask_input}]})
    assert refined.status_code == 200

    long_id = client.post("/segment", json={"image_id": "f" * 100_000, "prompts": [point]})
    assert long_id.status_code == 404 and len(long_id.get_data()) < 300

    vendor_json = client.post("/segment", data=json.dumps({"image_id": ids[0], "prompts": [point]}),
                              content_type="application/vnd.api+json")
    assert vendor_json.status_code == 200, vendor_json.get_json()

    misses = cache_metrics(client)["misses_total"]
    new_image = make_scene(150, 200, seed=3)
    for fields, words in [
        ({"prompts": json.dumps([point]), "image_id": ids[0]}, "image_id goes in a JSON body"),
        ({"prompts": [json.dumps([point])] * 2}, "prompts: sent 2 times"),
        ({"prompts": deep}, "prompts: the JSON is nested too deeply"),
        ({"prompts": "[{not json"}, "prompts: not valid JSON: Expecting property name"),
        ({"prompts": " "}, "prompts: expected a form field with a JSON list"),
        ({"prompts": "\ufeff "}, "prompts: expected a form field with a JSON list"),  # a byte-order mark alone
        ({"prompts": json.dumps([{"points": [[500, 1]]}])}, "prompts[0].points[0]"),
        ({"prompts": '[{"box": [0, 0, 5, 5], "box": [0, 0, 9, 9]}]'}, "prompts: 'box' is given twice in one object"),
        ({"prompts": '[{"box": [0, 0, 10, -%s]}]' % ("9" * 5000)}, "prompts[0].box"),
        # A file of another name is refused as a text field is (a typo, or a second image).
        ({"prompts": json.dumps([point]), "promts": (io.BytesIO(b"[]"), "p.json")}, "unknown form fields 'promts'"),
        ({"prompts": (io.BytesIO(json.dumps([point]).encode()), "p.json")}, "curl -F 'prompts=<prompts.json'"),
    ]:
        response = client.post("/segment", data={"image": (io.BytesIO(png(new_image)), "a.png"), **fields})
        assert response.status_code == 400 and words in response.get_json()["error"], (fields, response.get_json())
    assert cache_metrics(client)["misses_total"] == misses  # none of them encoded the image
    # A mask_input id can only be held for an image encoded already: a new image's is refused before its encoding.
    for image, mask_id_sent in [(new_image, "zzz"), (new_image, mask_input)]:
        response = client.post("/segment", data={"image": (io.BytesIO(png(image)), "a.png"),
                                                 "prompts": json.dumps([{**point, "mask_input": mask_id_sent}])})
        assert response.status_code == 404 and "unknown mask_input" in response.get_json()["error"]
    misses += 2  # the two ids looked for, not the image: not encoded
    assert cache_metrics(client)["misses_total"] == misses
    one_shot = client.post("/segment", data={"image": (io.BytesIO(png(make_scene(150, 200, seed=1))), "a.png"),
                                             "prompts": json.dumps([{**point, "mask_input": mask_input}])})
    assert one_shot.status_code == 200 and one_shot.get_json() == refined.get_json()  # the id of the image sent
    # A part that names no field (a hand-made form): werkzeug filed it under None, a TypeError (500).
    from .test_http_front import multipart

    image = ("image", "a.png", png(new_image))
    for endpoint, parts in [("/segment", [image, ("prompts", None, json.dumps([point]).encode()), (None, None, b"x")]),
                            ("/segment", [image, ("prompts", None, json.dumps([point]).encode()), (None, "b", b"x")]),
                            ("/embed", [image, (None, "b.png", b"x")]), ("/upload_rle", [image, (None, None, b"x")]),
                            ("/upload", [(None, "a.png", image[2])])]:
        response = client.post(endpoint, data=multipart(parts)[0], content_type=multipart(parts)[1])
        assert response.status_code == 400 and response.get_json()["error"] == (
            "the body is not a multipart form that can be read (a part has no name in its Content-Disposition); "
            "send the image as curl -F 'image=@file.jpg'"), (endpoint, parts[-1])
    # A form cut short: said so, on /segment as on the uploads (werkzeug's parser gave an empty form,
    # and /segment said "prompts: expected a form field").
    whole = multipart([image, ("prompts", None, json.dumps([point]).encode())])
    for endpoint in ("/segment", "/embed", "/upload_rle"):
        response = client.post(endpoint, data=whole[0][:-200], content_type=whole[1])
        assert response.status_code == 400 and response.get_json()["error"] == (
            "the body is not a multipart form that can be read (it ends before its last line, '--b--'); "
            "send the image as curl -F 'image=@file.jpg'"), endpoint
    assert cache_metrics(client)["misses_total"] == misses
    path_not_file = client.post("/segment", data={"image": "a.png", "prompts": json.dumps([point])},  # no @
                                content_type="multipart/form-data")
    assert path_not_file.status_code == 400 and "curl -F 'image=@file.jpg'" in path_not_file.get_json()["error"]


def test_embed_refuses_a_cache_too_small_for_one_image(micro):
    """An /embed id that no /segment could use is refused (507, saying what to do); a one-shot
    multipart /segment needs no cache and still works."""
    client = micro_client(micro, cache_bytes=0)
    embedded = client.post("/embed", data={"image": (io.BytesIO(png(IMAGE)), "a.png")})
    assert embedded.status_code == 507 and "--embedding-cache-mb" in embedded.get_json()["error"]
    assert cache_metrics(client)["misses_total"] == 0  # refused before encoding
    one_image = PromptSegmenter(micro, "micro").embed(IMAGE).nbytes
    client = micro_client(micro, cache_bytes=one_image - 1)
    embedded = client.post("/embed", data={"image": (io.BytesIO(png(IMAGE)), "a.png")})
    assert embedded.status_code == 507 and "(0.5 MiB)" in embedded.get_json()["error"]
    client = micro_client(micro, cache_bytes=int(0.3 * 2**20))  # --embedding-cache-mb 0.3: 314572 bytes
    embedded = client.post("/embed", data={"image": (io.BytesIO(png(IMAGE)), "a.png")})
    assert embedded.status_code == 507 and "the embedding cache (0.3 MiB) cannot hold" in embedded.get_json()["error"]
    client = micro_client(micro, cache_bytes=419)  # --embedding-cache-mb 0.0004
    embedded = client.post("/embed", data={"image": (io.BytesIO(png(IMAGE)), "a.png")})
    assert "the embedding cache (419 bytes) cannot hold" in embedded.get_json()["error"]
    one_shot = client.post("/segment", data={"image": (io.BytesIO(png(IMAGE)), "a.png"),
                                             "prompts": json.dumps([PROMPTS[0][1]])})
    assert one_shot.status_code == 200 and len(one_shot.get_json()["results"][0]["masks"]) == 3


def test_kept_logits_never_evict_their_own_image(micro):
    """A small cache filled by one request's kept logits drops older logits, not the image they
    were made on (which would turn the next /segment on it into a 404), and the sets' best masks'
    last (the ones a client refines: the first sets' went first); the answer names only the
    logits still held (null for the others), and each of those refines."""
    segmenter = PromptSegmenter(micro, "micro")
    one_image, one_mask = segmenter.embed(IMAGE).nbytes, 64 * 64 * 4  # the micro model's logits: 64x64 float32
    client = micro_client(micro, cache_bytes=one_image + 4 * one_mask)  # PROMPTS keep 10
    image_id = client.post("/embed", data={"image": (io.BytesIO(png(IMAGE)), "a.png")}).get_json()["image_id"]
    prompts = [{**prompt, "keep_logits": True} for _, prompt in PROMPTS]
    answer = client.post("/segment", json={"image_id": image_id, "prompts": prompts})
    assert answer.status_code == 200
    assert cache_metrics(client)["evictions_total"] > 0  # the logits did not all fit
    results = answer.get_json()["results"]
    ids = [key for result in results for key in result["mask_input_ids"]]
    held = [key for key in ids if key is not None]
    assert len(ids) == 10 and len(held) == 4  # the last four stored: the last sets', each set's best first
    # Stored every set's worst first, the best ones last: those four held.
    stored = sorted(((rank, index) for index, result in enumerate(results) for rank in range(len(result["masks"]))),
                    key=lambda item: -item[0])
    assert {(rank, index) for index, result in enumerate(results) for rank, key in enumerate(result["mask_input_ids"])
            if key is not None} == set(stored[-4:])
    assert all(result["mask_input_ids"][0] is not None for result in results[-3:])  # each set's best
    # Room for two: a box's one mask, then a point's three keep both sets' best (the box's went
    # for the point's second and third, stored after it).
    small = micro_client(micro, cache_bytes=one_image + 2 * one_mask)
    small_id = small.post("/embed", data={"image": (io.BytesIO(png(IMAGE)), "a.png")}).get_json()["image_id"]
    two = [{**PROMPTS[4][1], "keep_logits": True}, {**PROMPTS[0][1], "keep_logits": True}]
    results = small.post("/segment", json={"image_id": small_id, "prompts": two}).get_json()["results"]
    assert [[key is not None for key in result["mask_input_ids"]] for result in results] == [[True],
                                                                                             [True, False, False]]
    for key in held:
        refine = {"points": [[60, 70]], "labels": [1], "mask_input": key, "multimask": False}
        assert client.post("/segment", json={"image_id": image_id, "prompts": [refine]}).status_code == 200
    assert client.post("/segment", json={"image_id": image_id, "prompts": [PROMPTS[0][1]]}).status_code == 200


def test_segment_does_its_torch_work_on_the_workers_thread(micro, monkeypatch):
    """Masks to RLE and the kept logits' copies run on the model's thread, not the request's:
    torch work on an HTTP thread starts a thread pool there (sam2serve/worker.py)."""
    threads = []

    def recording(masks):
        threads.append(threading.current_thread().name)
        return masks_to_rle_vectorized(masks)

    monkeypatch.setattr(protocol, "masks_to_rle_vectorized", recording)
    client = micro_client(micro)
    prompts = [{**prompt, "keep_logits": True} for _, prompt in PROMPTS]
    answer = client.post("/segment", data={"image": (io.BytesIO(png(IMAGE)), "a.png"), "prompts": json.dumps(prompts)})
    assert answer.status_code == 200 and len(answer.get_json()["results"]) == len(PROMPTS)
    assert threads == ["inference-worker"] * len(PROMPTS)


def test_segment_runs_in_parts_of_bounded_mask_pixels_each_its_own_turn(micro, monkeypatch):
    """Prompt sets are decoded in parts of at most SEGMENT_PART_PIXELS of masks, each part a call
    of its own on the worker (a request that has gone stops between them): the masks of 64 sets
    on a large image never exist at once. The answer is the one of a single part."""
    client = micro_client(micro)
    image_id = client.post("/embed", data={"image": (io.BytesIO(png(IMAGE)), "a.png")}).get_json()["image_id"]
    body = {"image_id": image_id, "prompts": [{**prompt, "keep_logits": True} for _, prompt in PROMPTS]}
    whole = client.post("/segment", json=body).get_json()
    parts, calls = [], []
    segment, call = PromptSegmenter.segment, InferenceWorker.call
    monkeypatch.setattr(PromptSegmenter, "segment",
                        lambda self, embedding, prompts, *rest: parts.append(len(prompts)) or segment(
                            self, embedding, prompts, *rest))
    monkeypatch.setattr(InferenceWorker, "call", lambda self, *args, **kwargs: calls.append(1) or call(
        self, *args, **kwargs))
    # Masks per set: 3, 1, 3, 1, 1, 1 images' worth (multimask for one point); parts of 4 at most.
    monkeypatch.setattr(protocol, "SEGMENT_PART_PIXELS", 4 * 150 * 200)
    in_parts = client.post("/segment", json=body).get_json()
    assert parts == [2, 2, 2] and len(calls) == 3
    assert len(in_parts["results"]) == len(whole["results"]) == len(PROMPTS)
    for split, joined in zip(in_parts["results"], whole["results"]):
        assert np.array_equal(rles_to_masks(split["masks"]), rles_to_masks(joined["masks"]))
        assert np.allclose(split["iou_predictions"], joined["iou_predictions"], rtol=0, atol=1e-5)
        assert split["mask_input_ids"] == joined["mask_input_ids"] and None not in split["mask_input_ids"]
    # A kept mask of the last part refines as one of the first's would.
    refine = {"points": [[60, 70]], "mask_input": in_parts["results"][-1]["mask_input_ids"][0], "multimask": False}
    assert client.post("/segment", json={"image_id": image_id, "prompts": [refine]}).status_code == 200
    # One set larger than a part is a part alone.
    monkeypatch.setattr(protocol, "SEGMENT_PART_PIXELS", 1)
    parts.clear()
    assert client.post("/segment", json=body).status_code == 200 and parts == [1] * len(PROMPTS)


def test_a_segment_with_its_image_accepted_before_a_stop_is_answered(micro):
    """A multipart /segment calls the worker twice (encode, then decode): a stop between the
    two still answers it, and the worker ends only after it."""
    worker = InferenceWorker(max_queue=8, timeout_s=120)
    worker.start(None, PromptSegmenter(micro, "micro"))
    client = create_app(worker, info={"mode": "ao"}).test_client()
    gate, blocking = threading.Event(), threading.Event()

    def hold():
        blocking.set()
        gate.wait(timeout=30)

    blocker = threading.Thread(target=worker.call, args=(hold,), daemon=True)
    blocker.start()  # holds the worker while the /segment is accepted and queued
    assert blocking.wait(timeout=30)  # taken off the queue: what is queued next is the /segment's
    answers = []
    prompts = json.dumps([prompt for _, prompt in PROMPTS])
    segment = threading.Thread(target=lambda: answers.append(
        client.post("/segment", data={"image": (io.BytesIO(png(IMAGE)), "a.png"), "prompts": prompts})), daemon=True)
    segment.start()
    wait_for(lambda: worker.queue_depth >= 1, timeout=30)  # its encoding waits behind the blocker
    worker.stop()
    refused = client.post("/embed", data={"image": (io.BytesIO(png(IMAGE)), "a.png")})
    assert refused.status_code == 503 and "stopping" in refused.get_json()["error"]
    gate.set()
    segment.join(timeout=60)
    blocker.join(timeout=60)
    assert answers[0].status_code == 200, answers[0].get_json()
    assert len(answers[0].get_json()["results"]) == len(PROMPTS)


def test_a_one_shot_mask_input_is_not_lost_to_its_own_images_encoding(micro):
    """A one-shot /segment whose image has been evicted but whose mask_input is still cached: the
    image's encoding, stored again, must not evict the logits the request goes on to use."""
    segmenter = PromptSegmenter(micro, "micro")
    one_image, one_mask = segmenter.embed(IMAGE).nbytes, 64 * 64 * 4
    client = micro_client(micro, cache_bytes=one_image + 2 * one_mask)
    image_id = client.post("/embed", data={"image": (io.BytesIO(png(IMAGE)), "a.png")}).get_json()["image_id"]
    kept = client.post("/segment", json={"image_id": image_id, "prompts": [
        {**PROMPTS[0][1], "multimask": False, "keep_logits": True}]}).get_json()["results"][0]["mask_input_ids"][0]
    prompts = [{"mask_input": kept}]
    refined = client.post("/segment", json={"image_id": image_id, "prompts": prompts})  # the logits used last
    assert refined.status_code == 200
    other = png(make_scene(150, 200, seed=1))
    assert client.post("/embed", data={"image": (io.BytesIO(other), "b.png")}).status_code == 200  # evicts the image
    assert client.post("/segment", json={"image_id": image_id, "prompts": prompts}).status_code == 404
    one_shot = client.post("/segment", data={"image": (io.BytesIO(png(IMAGE)), "a.png"),
                                             "prompts": json.dumps(prompts)})
    assert one_shot.status_code == 200, one_shot.get_json()
    assert one_shot.get_json() == refined.get_json()


def test_small_cache_evicts_and_counts(micro):
    segmenter = PromptSegmenter(micro, "micro")
    one_image = segmenter.embed(IMAGE).nbytes
    client = micro_client(micro, cache_bytes=one_image)  # room for one image
    ids = [client.post("/embed", data={"image": (io.BytesIO(png(make_scene(150, 200, seed=s))), "a.png")})
           .get_json()["image_id"] for s in (1, 2)]
    assert cache_metrics(client)["evictions_total"] == 1
    assert client.post("/segment", json={"image_id": ids[0], "prompts": [PROMPTS[0][1]]}).status_code == 404
    assert client.post("/segment", json={"image_id": ids[1], "prompts": [PROMPTS[0][1]]}).status_code == 200


def test_half_precision_server_says_prompts_are_unavailable():
    worker = InferenceWorker()
    worker.start(generator=None, segmenter=None)
    client = create_app(worker, info={"mode": "fast_furious"}).test_client()
    for path in ("/embed", "/segment"):
        response = client.post(path, data={"image": (io.BytesIO(png(IMAGE)), "a.png"), "prompts": "[]"})
        assert response.status_code == 501 and "fast_furious" in response.get_json()["error"], path
    # An image_id (from another server, or from before a restart) gets the same answer, not 404.
    response = client.post("/segment", json={"image_id": "0" * 32, "prompts": [{"points": [[1, 1]]}]})
    assert response.status_code == 501 and "fast_furious" in response.get_json()["error"]


def test_load_test_mixing_embed_segment_and_upload_rle(tmp_path, monkeypatch):
    """8 clients mixing /upload_rle, /embed and /segment on a real server: every answer equals
    the answer to that request sent alone; on a terminal, its progress is shown as it goes. The
    cache holds one image of the two: an id evicted is embedded again, as a client should (the
    test counted the 404 as a wrong answer)."""
    from tools.load_test import run_load_test

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())

    from .test_server import start_server

    process, url = start_server("--points-per-side", "4", "--batch-size", "2", "--max-queue", "4",
                                "--embedding-cache-mb", "0.6", log_path=tmp_path / "server.log")
    try:
        images = {f"{seed}.png": png(make_scene(120, 160, seed=seed)) for seed in (1, 2)}
        report = run_load_test(url, images, clients=8, per_client=3, time_limit_s=240, interactive=True)
        assert report.ok, report.table()
        assert report.requests == 24 and report.embedded_again > 0
        shown = sys.stderr.getvalue()
        assert "single requests (the references)" in shown and "8 clients: 100%" in shown, shown[-500:]
        assert "24/24" in shown and "wrong=0" in shown
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_coco_annotations_equal_sam2s_records_and_the_default_answer(micro):
    """/upload_rle?format=coco: sam2 generate()'s fields, compressed RLE that pycocotools reads and
    COCO's box; the same masks as the default answer, and ao's records as the baseline's."""
    from pycocotools import mask as mask_utils

    from sam2serve.amg import ReferenceMaskGenerator

    image = make_scene(120, 160, seed=3)
    config = AMGConfig(points_per_side=8)
    ours = MaskGenerator(micro, config).annotate(image)
    reference = ReferenceMaskGenerator(micro, config).annotate(image)
    assert len(ours) == len(reference) > 3
    for a, b in zip(ours, reference):
        assert a.keys() == b.keys()
        assert (a["segmentation"], a["area"], a["bbox"], a["crop_box"]) == (
            b["segmentation"], b["area"], b["bbox"], b["crop_box"])
        np.testing.assert_allclose(a["point_coords"], b["point_coords"])
        assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-5
        assert abs(a["stability_score"] - b["stability_score"]) < 1e-3

    worker = InferenceWorker()
    worker.start(MaskGenerator(micro, config), None)
    client = create_app(worker).test_client()
    data = png(image)
    coco = client.post("/upload_rle?format=coco", data={"image": (io.BytesIO(data), "a.png")}).get_json()
    default = client.post("/upload_rle", data={"image": (io.BytesIO(data), "a.png")}).get_json()
    assert len(coco) == len(default)
    for annotation, rle in zip(coco, default.values()):
        assert isinstance(annotation["segmentation"]["counts"], str)
        assert np.array_equal(mask_utils.decode(annotation["segmentation"]), rles_to_masks([rle])[0])
        mask = rles_to_masks([rle])[0]
        assert annotation["area"] == int(mask.sum())
        ys, xs = np.nonzero(mask)  # COCO's box: the mask's extent, its last column and row in
        assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
    wrong = client.post("/upload?format=coco", data={"image": (io.BytesIO(data), "a.png")})
    assert wrong.status_code == 400 and "format" in wrong.get_json()["error"]
    # README's recipe: with an image, a category and a score, and without their box (pycocotools would
    # take its area for the mask's), the records load as pycocotools' mask results.
    from pycocotools.coco import COCO

    dataset = COCO()
    dataset.dataset = {"images": [{"id": 1, "height": 120, "width": 160}], "annotations": [],
                       "categories": [{"id": 1, "name": "object"}]}
    dataset.createIndex()
    results = dataset.loadRes([{key: value for key, value in record.items() if key != "bbox"}
                               | {"image_id": 1, "category_id": 1, "score": record["predicted_iou"]} for record in coco])
    assert [(annotation["area"], annotation["bbox"].tolist())
            for annotation in results.loadAnns(results.getAnnIds())] == [(record["area"], record["bbox"]) for record in coco]


def test_segment_in_coco_format_gives_the_json_answers_masks_as_annotations(micro):
    """/segment?format=coco: each prompt set's masks as COCO annotations (compressed RLE that
    pycocotools decodes, area, COCO's box), best first, with their predicted IoUs and kept
    logits' ids, those of the default answer; by image_id and in one multipart request alike."""
    from pycocotools import mask as mask_utils

    client = micro_client(micro)
    image_id = client.post("/embed", data={"image": (io.BytesIO(png(IMAGE)), "a.png")}).get_json()["image_id"]
    prompts = [{**prompt, "keep_logits": index % 2 == 0} for index, (_, prompt) in enumerate(PROMPTS)]
    default = client.post("/segment", json={"image_id": image_id, "prompts": prompts}).get_json()
    coco = client.post("/segment?format=coco", json={"image_id": image_id, "prompts": prompts}).get_json()
    assert coco["image_id"] == image_id and len(coco["results"]) == len(default["results"]) == len(PROMPTS)
    for prompt, result, expected in zip(prompts, coco["results"], default["results"]):
        assert list(result) == ["annotations"] and len(result["annotations"]) == len(expected["masks"])
        for rank, (annotation, rle) in enumerate(zip(result["annotations"], expected["masks"])):
            mask = rles_to_masks([rle])[0]
            assert np.array_equal(mask_utils.decode(annotation["segmentation"]), mask)
            assert annotation["area"] == int(mask.sum()) > 0
            ys, xs = np.nonzero(mask)
            assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert annotation["predicted_iou"] == expected["iou_predictions"][rank]
            assert annotation.get("mask_input_id") == (expected["mask_input_ids"][rank] if prompt["keep_logits"]
                                                       else None)
            assert ("mask_input_id" in annotation) == prompt["keep_logits"]
    one_shot = client.post("/segment?format=coco", data={"image": (io.BytesIO(png(IMAGE)), "a.png"),
                                                         "prompts": json.dumps(prompts)})
    assert one_shot.get_json() == coco


def test_each_endpoint_refuses_a_format_it_does_not_answer_in(micro):
    """?format= names one of the endpoint's own answers, given once: a format the endpoint does
    not have is refused, not silently answered in another (before it took format=coco,
    /segment answered RLE to it)."""
    client = micro_client(micro)
    for url, words in [
        ("/upload?format=coco", "'coco' is not a format of /upload, which answers png; /upload_rle and /segment "
                                "take format=coco for COCO annotations"),
        ("/upload?format=rle", "'rle' is not a format of /upload, which answers png; /upload_rle answers the masks "
                               "as RLE in JSON"),
        ("/upload?format=xml", "which answers png; /upload_rle and /segment take format=coco for COCO annotations"),
        ("/upload_rle?format=png", "'png' is not a format of /upload_rle, which answers rle or coco; /upload answers "
                                   "the PNG of the masks"),
        ("/upload_rle?format=json", "which answers rle or coco; /upload_rle answers JSON without it (leave format "
                                    "out)"),
        ("/upload_rle?format=xml", "which answers rle or coco; leave format out for its default"),
        ("/embed?format=rle", "which answers json; /upload_rle answers the masks as RLE in JSON (/segment those of "
                              "prompts)"),
        ("/upload_rle?format=coco&format=rle", "format: given twice; give it once"),
        ("/upload_rle?format=&format=coco&format=", "format: given 3 times"),  # as a setting given again, empty or not
        ("/embed?format=coco", "'coco' is not a format of /embed, which answers json"),
        ("/segment?format=rle", "'rle' is not a format of /segment, which answers json or coco; /segment answers "
                                "JSON without it (leave format out)"),
    ]:
        response = client.post(url, data={"image": (io.BytesIO(png(IMAGE)), "a.png")})
        assert response.status_code == 400 and words in response.get_json()["error"], url
    for url in ("/upload?format=png", "/upload_rle?format=rle", "/embed?format=json", "/upload_rle?format="):
        assert client.post(url, data={"image": (io.BytesIO(png(IMAGE)), "a.png")}).status_code == 200, url


def test_a_requests_own_thresholds_give_sam2s_masks_under_them(micro):
    """/upload_rle?pred_iou_thresh=...: the masks sam2's generator makes under those settings, in
    ao and in baseline mode, while the next request without them gets the server's own."""
    from sam2serve.amg import ReferenceMaskGenerator

    image = make_scene(120, 160, seed=3)
    config = AMGConfig(points_per_side=8)
    asked = {"pred_iou_thresh": 0.5, "stability_score_thresh": 0.8, "stability_score_offset": 2.0, "box_nms_thresh": 0.9}
    expected = ReferenceMaskGenerator(micro, dataclasses.replace(config, **asked)).generate(image)
    default = ReferenceMaskGenerator(micro, config).generate(image)
    assert len(expected) > len(default) > 3  # every setting counts here (16 masks; 8 with the server's)
    query = "&".join(f"{name}={value}" for name, value in asked.items())
    for generator in (MaskGenerator(micro, config), ReferenceMaskGenerator(micro, config)):
        cache = EmbeddingCache(2**30)
        # ao keeps the image's encoding for an /embed of it: under a request's settings too
        keeps = protocol.share_encodings(generator, PromptSegmenter(micro, "micro"), cache)
        assert keeps == isinstance(generator, MaskGenerator)
        worker = InferenceWorker()
        worker.start(generator, None)
        client = create_app(worker, cache=cache).test_client()

        def post(url):
            response = client.post(url, data={"image": (io.BytesIO(png(image)), "a.png")})
            assert response.status_code == 200, response.get_data()
            return response.get_json()

        assert list(post(f"/upload_rle?{query}").values()) == expected, type(generator).__name__
        assert cache.stats().spares == keeps
        records = post(f"/upload_rle?format=coco&{query}")
        assert len(records) == len(expected) and min(record["predicted_iou"] for record in records) <= 0.8
        assert list(post("/upload_rle").values()) == default
        assert post("/upload_rle?pred_iou_thresh=&box_nms_thresh=0.7") == post("/upload_rle")  # empty: the server's


def test_records_of_every_candidate_are_strict_json(micro):
    """With the filters off, a mask can be empty at both of its stability levels, where sam2's
    stability score is 0/0: the record says null, as NaN is no JSON."""
    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    worker = InferenceWorker()
    worker.start(MaskGenerator(micro, AMGConfig(points_per_side=16)), None)
    client = create_app(worker).test_client()
    response = client.post("/upload_rle?format=coco&pred_iou_thresh=0&stability_score_thresh=0&box_nms_thresh=1",
                           data={"image": (io.BytesIO(png(make_scene(120, 160, seed=3))), "a.png")})
    scores = [record["stability_score"] for record in json.loads(response.get_data(), parse_constant=no_constants)]
    assert len(scores) == 768 and scores.count(None) == 1  # every candidate, one of them 0/0
    assert all(0.0 <= score <= 1.0 for score in scores if score is not None)


@pytest.mark.parametrize("flush", [False, True])
def test_a_clients_numbers_read_alike_in_threads_that_flush_denormals_and_not(flush):
    """A subnormal number (1e-310) is 0 to a thread that flushes denormals (every thread of
    server.py's) and not to one that does not (a Ray Serve replica's event loop, which took
    stability_score_offset=1e-310 for above 0 while its model thread refused it: a 500). Read
    from a client, it is 0 in both."""
    from concurrent.futures import ThreadPoolExecutor

    from sam2serve.protocol import BadRequest, parse_json, request_settings

    def read() -> tuple:
        torch.set_flush_denormal(flush)
        try:
            request_settings("/upload_rle", [("stability_score_offset", "1e-310")])
        except BadRequest as error:
            refused = str(error)
        return (parse_json('{"points": [[1e-310, -4.9e-324]], "x": 2.5e-308}', "the body"),
                request_settings("/upload_rle", [("pred_iou_thresh", "-1e-310")]), refused)

    with ThreadPoolExecutor(1) as thread:
        body, settings, refused = thread.submit(read).result()
    assert body == {"points": [[0.0, 0.0]], "x": 2.5e-308} and settings == {"pred_iou_thresh": 0.0}
    assert refused == "stability_score_offset must be above 0 and at most 1000, got 0.0"


@pytest.mark.parametrize("url, words", [
    ("/upload_rle?pred_iou=0.5", "query parameter 'pred_iou' is not one /upload_rle takes: format, pred_iou_thresh, "
                                 "stability_score_thresh, stability_score_offset, box_nms_thresh"),
    ("/upload?points_per_side=64", "query parameter 'points_per_side' is not one /upload takes"),
    ("/upload_rle?pred_iou_thresh=high", "pred_iou_thresh: 'high' is not a number"),
    ("/upload_rle?pred_iou_thresh=1.5", "pred_iou_thresh must be within [0, 1], got 1.5"),
    ("/upload_rle?box_nms_thresh=nan", "box_nms_thresh: 'nan' is not a number"),
    # What Python's float() reads besides plain numbers: 0_5 as 5, digits of other scripts.
    ("/upload_rle?stability_score_offset=0_5", "stability_score_offset: '0_5' is not a number"),
    ("/upload_rle?pred_iou_thresh=%EF%BC%90.%EF%BC%95", "pred_iou_thresh: '\uff10.\uff15' is not a number"),
    ("/upload_rle?pred_iou_thresh=%200.5", "pred_iou_thresh: ' 0.5' is not a number"),
    ("/upload_rle?stability_score_offset=1" + "0" * 400, "stability_score_offset: '1000000000000000000000000000000000000000"
                                                         "...' is not a finite number"),
    # at 0 or below, stability scores above 1 and 0/0 (NaN, which is no JSON, in ?format=coco)
    ("/upload_rle?format=coco&stability_score_offset=-50", "stability_score_offset must be above 0 and at most 1000"),
    ("/upload_rle?stability_score_offset=0", "stability_score_offset must be above 0"),
    ("/upload_rle?pred_iou_thresh=0.5&pred_iou_thresh=0.6", "pred_iou_thresh: given twice"),
    ("/upload_rle?box_nms_thresh=0.5&box_nms_thresh=", "box_nms_thresh: given twice"),
    ("/embed?pred_iou_thresh=0.5", "query parameter 'pred_iou_thresh' is not one /embed takes: format"),
    ("/segment?stability_score_thresh=0.5", "is not one /segment takes: format"),
])
def test_settings_a_request_cannot_have_are_refused(micro, url, words):
    client = micro_client(micro)
    response = client.post(url, data={"image": (io.BytesIO(png(IMAGE)), "a.png")})
    assert response.status_code == 400 and words in response.get_json()["error"], response.get_json()
    assert client.get("/health").status_code == 200


PARSED_SIZE = (100, 200)  # (h, w) of the prompts' image below


def test_the_limits_themselves_are_accepted_one_more_is_refused():
    assert len(parse_prompts([{"points": [[1, 1]]}] * MAX_PROMPT_SETS, PARSED_SIZE)) == MAX_PROMPT_SETS
    most = [[i % 200, i % 100] for i in range(MAX_POINTS)]
    assert len(parse_prompts([{"points": most}], PARSED_SIZE)[0].points) == MAX_POINTS
    with pytest.raises(ValueError, match=re.escape(f"prompts[0].points: expected a list of at most {MAX_POINTS}")):
        parse_prompts([{"points": most + [[1, 1]]}], PARSED_SIZE)


def test_points_and_boxes_on_the_images_far_border_are_inside():
    """Coordinates are continuous: x == width, y == height is the border, as a box [0, 0, w, h]."""
    (point,) = parse_prompts([{"points": [[200, 100]]}], PARSED_SIZE)
    assert point.points.tolist() == [[200.0, 100.0]]
    assert parse_prompts([{"box": [0, 0, 200, 100]}], PARSED_SIZE)[0].box.tolist() == [0, 0, 200, 100]
    assert parse_prompts([{"box": [5, 5, 5, 40]}], PARSED_SIZE)[0].box.tolist() == [5, 5, 5, 40]  # x0 == x1 allowed
    for outside in ([[200.5, 10]], [[10, 100.5]], [[-0.1, 10]]):
        with pytest.raises(ValueError, match=re.escape("prompts[0].points[0]:")):
            parse_prompts([{"points": outside}], PARSED_SIZE)


@pytest.mark.parametrize("prompt, field", [
    ({"box": [10, 50, 20, 40]}, "prompts[0].box"),  # y1 < y0
    ({"points": [[10, 10]], "labels": [True]}, "prompts[0].labels[0]"),  # a bool is no label
    ({"points": [[True, 10]]}, "prompts[0].points[0]"),  # nor a coordinate
    ({"box": [0, 0, 10, False]}, "prompts[0].box"),
    ({"points": [[10, 10]], "multimask": 1}, "prompts[0].multimask"),
    ({"points": [[10, 10]], "keep_logits": "yes"}, "prompts[0].keep_logits"),
    ({"points": [[10, 10]], "mask_input": 7}, "prompts[0].mask_input"),
    ({"points": [[10, 10]], "extra": 1}, "prompts[0]"),
])
def test_more_bad_prompts_name_the_field(prompt, field):
    with pytest.raises(ValueError, match="^" + re.escape(field) + ":"):
        parse_prompts([prompt], PARSED_SIZE)


def test_a_library_callers_tuples_and_numpy_numbers_are_prompts_too():
    """parse_prompts from Python, not JSON: tuples and numpy's numbers and flags read as JSON's
    lists, numbers and booleans (they were refused as "expected 2 finite numbers")."""
    as_json = parse_prompts([{"points": [[100, 80], [10.5, 20]], "labels": [1, 0], "box": [10, 10, 50, 50],
                              "multimask": True}], PARSED_SIZE)[0]
    from_python = parse_prompts([{"points": [(np.int64(100), np.int32(80)), (np.float32(10.5), 20)],
                                  "labels": (np.int64(1), 0), "box": (10, 10, np.float64(50), 50),
                                  "multimask": np.True_}], PARSED_SIZE)[0]
    assert np.array_equal(from_python.points, as_json.points) and np.array_equal(from_python.box, as_json.box)
    assert np.array_equal(from_python.labels, as_json.labels) and from_python.multimask is True
    for bad in ({"points": [(np.float64("nan"), 1)]}, {"points": [(np.True_, 1)]}, {"points": [[1, 1]],
                                                                                      "labels": [np.True_]}):
        with pytest.raises(ValueError, match=r"^prompts\[0\]"):
            parse_prompts([bad], PARSED_SIZE)


def test_image_ids_differ_for_the_same_bytes_in_another_shape(tiny_model):
    """An id names the image's pixels: the same bytes as 2x6 or 6x2 or 3x4 are other images."""
    segmenter = PromptSegmenter(tiny_model, "test")
    pixels = np.arange(36, dtype=np.uint8)
    ids = {segmenter.image_id(pixels.reshape(shape)) for shape in ((2, 6, 3), (6, 2, 3), (3, 4, 3))}
    assert len(ids) == 3
    assert segmenter.image_id(pixels.reshape(2, 6, 3)) == segmenter.image_id(pixels.copy().reshape(2, 6, 3))
