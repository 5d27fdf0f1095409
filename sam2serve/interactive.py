"""Interactive segmentation: point and box prompts on an image encoded once.

An image is encoded once (`PromptSegmenter.embed`) and its features kept in an `EmbeddingCache`
(an LRU bounded by bytes) under an id derived from its pixels and the model; each prompt set
(points with labels, a box, a previous mask's low-resolution logits) then costs one mask-decoder
call, and the prompt sets of one request that have the same shape run as one batched call.
The numbers are sam2's own: encoding and decoding go through the `sam2` package's
SAM2ImagePredictor, except that clicks (one foreground point per prompt set) are decoded by the
project's FactoredPointDecoder, the same function without sam2's per-prompt copies of the image;
answers equal the predictor's `predict` on the model as sam2 builds it by default
(tests/test_interactive.py compares them): a single mask asked for is chosen by stability
(`sam2_prompt_settings`), where segment-everything's model, built as the study built it, leaves
that off.
Nothing here knows of HTTP; `parse_prompts` checks a request's prompts and names the field at
fault.
"""

import contextlib
import hashlib
import json
import math
import numbers
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from sam2.modeling.sam2_base import SAM2Base

from .amg import BOOLEANS, image_predictor
from .model import FactoredPointDecoder, ImageFeatures, default_prompts_per_step, model_coords
from .upscale import masks_above

MAX_PROMPT_SETS = 64  # per request
MAX_POINTS = 64  # per prompt set


class InvalidPrompt(ValueError):
    """A prompt that cannot be run; the message names the field."""


class UnknownId(KeyError):
    """An image or mask id that the cache does not hold (never seen, or evicted)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Prompt:
    """One prompt set, in image pixels."""

    points: np.ndarray  # (N, 2) float32 (x, y); N may be 0 when there is a box
    labels: np.ndarray  # (N,) int32: 1 foreground, 0 background
    box: np.ndarray | None  # (4,) float32 x0, y0, x1, y1
    mask_input: str | None  # the id of a previous answer's mask, to refine
    multimask: bool
    keep_logits: bool  # answer ids of the masks' logits, for a later mask_input

    @property
    def shape(self) -> tuple:
        """Prompt sets of one shape run as one batched decoder call."""
        return len(self.points), self.box is None, self.mask_input is None, self.multimask

    def canonical(self) -> str:
        return json.dumps([self.points.tolist(), self.labels.tolist(), None if self.box is None else self.box.tolist(),
                           self.mask_input, self.multimask])


def parse_prompts(prompts: Any, size: tuple[int, int]) -> list[Prompt]:
    """A request's "prompts" (a list of prompt sets) checked against the image size (h, w)."""
    if isinstance(prompts, dict):  # one prompt set, not in a list
        raise InvalidPrompt("prompts: expected a list of prompt sets, got one object: put it in a list, [{...}]")
    if not isinstance(prompts, list) or not prompts:
        raise InvalidPrompt("prompts: expected a non-empty list of prompt sets")
    if len(prompts) > MAX_PROMPT_SETS:
        raise InvalidPrompt(f"prompts: {len(prompts)} prompt sets, at most {MAX_PROMPT_SETS} per request")
    return [parse_prompt(prompt, size, f"prompts[{index}]") for index, prompt in enumerate(prompts)]


PROMPT_FIELDS = ("points", "labels", "box", "mask_input", "multimask", "keep_logits")


def parse_prompt(prompt: Any, size: tuple[int, int], where: str) -> Prompt:
    height, width = size
    if not isinstance(prompt, dict):
        raise InvalidPrompt(f"{where}: expected an object with {', '.join(PROMPT_FIELDS)}")
    unknown = set(prompt) - set(PROMPT_FIELDS)
    if unknown:
        raise InvalidPrompt(f"{where}: unknown fields {names_shown(unknown)}; a prompt set has "
                            f"{', '.join(PROMPT_FIELDS)}")
    prompt = {name: value for name, value in prompt.items() if value is not None}  # null: as if left out
    points = prompt.get("points", [])
    if not isinstance(points, SEQUENCES) or len(points) > MAX_POINTS:
        raise InvalidPrompt(f"{where}.points: expected a list of at most {MAX_POINTS} [x, y] pairs")
    for index, point in enumerate(points):
        numbers_of(point, 2, f"{where}.points[{index}]", "[x, y]")
        inside(point, width, height, f"{where}.points[{index}]")
    labels = prompt.get("labels", [1] * len(points))
    if not isinstance(labels, SEQUENCES) or len(labels) != len(points):
        raise InvalidPrompt(f"{where}.labels: expected one label per point ({len(points)}), got "
                            f"{len(labels) if isinstance(labels, SEQUENCES) else type(labels).__name__}")
    for index, label in enumerate(labels):
        if label not in (0, 1) or isinstance(label, BOOLEANS):
            raise InvalidPrompt(f"{where}.labels[{index}]: each label is 1 (foreground) or 0 (background)")
    box = prompt.get("box")
    if box is not None:
        numbers_of(box, 4, f"{where}.box", "[x0, y0, x1, y1]")
        x0, y0, x1, y1 = box
        if x1 < x0 or y1 < y0:
            raise InvalidPrompt(f"{where}.box: expected [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1")
        inside((x0, y0), width, height, f"{where}.box")
        inside((x1, y1), width, height, f"{where}.box")
    mask_input = prompt.get("mask_input")
    if mask_input is not None and not isinstance(mask_input, str):
        raise InvalidPrompt(f"{where}.mask_input: expected a mask id from an answer given with keep_logits")
    if not points and box is None and mask_input is None:  # a mask alone is a prompt too, as in sam2's predict
        raise InvalidPrompt(f"{where}: give points, a box or a mask_input (or several of them)")
    # sam2's advice: several masks for an ambiguous prompt (a single point), one otherwise.
    multimask = prompt.get("multimask", len(points) == 1 and box is None)
    keep_logits = prompt.get("keep_logits", False)
    for name, value in (("multimask", multimask), ("keep_logits", keep_logits)):
        if not isinstance(value, BOOLEANS):
            raise InvalidPrompt(f"{where}.{name}: expected true or false")
    return Prompt(
        points=np.array(points, dtype=np.float32).reshape(-1, 2),
        labels=np.array(labels, dtype=np.int32),
        box=None if box is None else np.array(box, dtype=np.float32),
        mask_input=mask_input,
        multimask=bool(multimask),
        keep_logits=bool(keep_logits),
    )


# What a prompt's lists may be: JSON's, and a library caller's tuples (its flags: amg.BOOLEANS).
SEQUENCES = (list, tuple)


def numbers_of(value: Any, count: int, where: str, written: str) -> None:
    # JSON's numbers: floats (which may be inf or nan) and ints of any size (math.isfinite
    # cannot take one beyond a float's range; inside() refuses it); a library caller's numpy ones.
    if (not isinstance(value, SEQUENCES) or len(value) != count
            or not all(isinstance(v, numbers.Real) and not isinstance(v, BOOLEANS)
                       and (isinstance(v, numbers.Integral) or math.isfinite(v)) for v in value)):
        raise InvalidPrompt(f"{where}: expected {count} finite numbers, {written}")


def inside(point, width: int, height: int, where: str) -> None:
    x, y = point
    if not (0 <= x <= width and 0 <= y <= height):
        raise InvalidPrompt(f"{where}: ({number_text(x)}, {number_text(y)}) is outside the {width}x{height} image")


def shown(text: str, limit: int = 40) -> str:
    """A client's string as an error message repeats it: at most limit characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def names_shown(names: Iterable[str], most: int = 10) -> str:
    """Names a client sent, as an error message lists them: sorted, the first `most` (shown),
    and how many more."""
    names = sorted(names)
    listed = ", ".join(shown(name) for name in names[:most])
    return listed + (f" and {len(names) - most} more" if len(names) > most else "")


def number_text(value: int | float, limit: int = 20) -> str:
    """A client's number as a message repeats it: JSON integers may have thousands of digits."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Embedding:
    """An encoded image: sam2's predictor features and the image's size."""

    features: dict  # {"image_embed": (1, C, h, w), "high_res_feats": [(1, C', 4h, 4w), (1, C'', 2h, 2w)]}
    size: tuple[int, int]  # (h, w) of the image

    @property
    def nbytes(self) -> int:
        tensors = [self.features["image_embed"], *self.features["high_res_feats"]]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class PromptAnswer:
    """One prompt set's masks, best predicted IoU first."""

    masks: torch.Tensor  # (M, H, W) bool
    iou_predictions: torch.Tensor  # (M,)
    low_res_logits: torch.Tensor  # (M, 256, 256) for the official models: a later mask_input


# build_sam2's apply_postprocessing (its default, SAM2ImagePredictor.from_pretrained's and that of
# sam2's demos): where one mask is asked for and the decoder's single-mask output is unstable, the
# most confident of its other three masks answers instead.
SAM2_PROMPT_SETTINGS = {"dynamic_multimask_via_stability": True, "dynamic_multimask_stability_delta": 0.05,
                        "dynamic_multimask_stability_thresh": 0.98}


@contextlib.contextmanager
def sam2_prompt_settings(model: SAM2Base):
    """The model's mask decoder set as sam2 builds it for prompts, meanwhile. One model serves
    both: segment-everything's is built without them (apply_postprocessing=False, the study's
    setting, which matters for use_m2m's single-mask refinement), and runs on the same thread."""
    decoder = model.sam_mask_decoder
    saved = {name: getattr(decoder, name) for name in SAM2_PROMPT_SETTINGS}
    for name, value in SAM2_PROMPT_SETTINGS.items():
        setattr(decoder, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(decoder, name, value)


class PromptSegmenter:
    """sam2's SAM2ImagePredictor for one model, its features set from the cache for each call.

    Not thread-safe (the predictor holds state): the server runs it on its inference worker.
    """

    def __init__(self, model: SAM2Base, model_id: str) -> None:
        self.predictor = image_predictor(model)
        self.model_id = model_id
        # Clicks (one foreground point per prompt set) go through the project's factored
        # decoder: sam2's decoder function without its per-prompt copies of the image.
        step = default_prompts_per_step(model)
        self.click_decoders = {multimask: FactoredPointDecoder(model, multimask, step) for multimask in (True, False)}

    def image_id(self, image: np.ndarray) -> str:
        """Content-derived: the same pixels on the same model give the same id."""
        digest = hashlib.sha256(f"{self.model_id}|{image.shape}".encode())
        digest.update(np.ascontiguousarray(image).data)
        return digest.hexdigest()[:32]

    @torch.inference_mode()
    def embedding_of(self, image: np.ndarray, features: ImageFeatures) -> Embedding:
        """The Embedding of encoder features computed elsewhere (segment-everything's, where its
        encoder gives sam2's predictor's features exactly: MaskGenerator.encodes_as_sam2),
        copied out of their batch."""
        return Embedding(features={"image_embed": features.image_embed.clone(),
                                   "high_res_feats": [level.clone() for level in features.high_res_feats]},
                         size=(image.shape[0], image.shape[1]))

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> Embedding:
        try:
            self.predictor.set_image(image)
            return Embedding(features=self.predictor._features, size=tuple(self.predictor._orig_hw[0]))
        finally:
            self.predictor.reset_predictor()

    @torch.inference_mode()
    def segment(self, embedding: Embedding, prompts: list[Prompt],
                mask_inputs: dict[str, torch.Tensor] | None = None) -> list[PromptAnswer]:
        """Each prompt set's answer, in order; `mask_inputs` maps the prompts' mask_input ids to
        low-resolution logits (h, w)."""
        predictor = self.predictor
        predictor._features, predictor._orig_hw = embedding.features, [embedding.size]
        predictor._is_image_set, predictor._is_batch = True, False
        answers: list[PromptAnswer | None] = [None] * len(prompts)
        try:
            groups: dict[tuple | int, list[int]] = {}
            for index, prompt in enumerate(prompts):
                # A mask_input alone runs by itself: sam2's _predict repeats the image for a batch
                # of points or boxes only (batched, its decoder fails an assertion).
                alone = len(prompt.points) == 0 and prompt.box is None
                groups.setdefault(index if alone else prompt.shape, []).append(index)
            with sam2_prompt_settings(predictor.model):
                for indices in groups.values():
                    for index, answer in zip(indices, self.segment_batch([prompts[i] for i in indices],
                                                                         mask_inputs or {})):
                        answers[index] = answer
        finally:
            predictor.reset_predictor()
        return answers

    def segment_batch(self, prompts: list[Prompt], mask_inputs: dict[str, torch.Tensor]) -> list[PromptAnswer]:
        """Prompt sets of one shape in one decoder call, as SAM2ImagePredictor.predict runs them."""
        first = prompts[0]
        if len(first.points) == 1 and first.box is None and first.mask_input is None and all(
            p.labels[0] == 1 for p in prompts
        ):
            return self.segment_clicks(prompts)
        points = np.stack([p.points for p in prompts]) if len(first.points) else None
        labels = np.stack([p.labels for p in prompts]) if len(first.points) else None
        boxes = None if first.box is None else np.stack([p.box for p in prompts])
        masks_in = None
        if first.mask_input is not None:
            masks_in = torch.stack([mask_inputs[p.mask_input] for p in prompts])[:, None]  # (B, 1, h, w)
        mask_input, coords, labels, boxes = self.predictor._prep_prompts(points, labels, boxes, masks_in, True)
        masks, iou_predictions, low_res = self.predictor._predict(coords, labels, boxes, mask_input, first.multimask)
        return self.best_first(masks, iou_predictions, low_res)


    def segment_clicks(self, prompts: list[Prompt]) -> list[PromptAnswer]:
        """One foreground point per prompt set: FactoredPointDecoder (tests compare it with
        sam2's decoder) for the logits, then sam2's upscale and threshold, computed only at the
        masks' edges (upscale.masks_above, tested against sam2's postprocess_masks)."""
        predictor = self.predictor
        height, width = predictor._orig_hw[0]
        points = torch.as_tensor(np.stack([p.points[0] for p in prompts]), device=predictor.device)
        features = predictor._features
        low_res, iou_predictions = self.click_decoders[prompts[0].multimask](
            features["image_embed"], *features["high_res_feats"],
            model_coords(points, (height, width), predictor.model.image_size),
        )
        masks = masks_above(low_res, (height, width), predictor.mask_threshold)  # = sam2's postprocess_masks > threshold
        return self.best_first(masks, iou_predictions, torch.clamp(low_res, -32.0, 32.0))

    @staticmethod
    def best_first(masks: torch.Tensor, iou_predictions: torch.Tensor, low_res: torch.Tensor) -> list[PromptAnswer]:
        answers = []
        for b in range(len(masks)):
            order = torch.argsort(iou_predictions[b], descending=True, stable=True)
            answers.append(PromptAnswer(masks=masks[b][order], iou_predictions=iou_predictions[b][order],
                                        low_res_logits=low_res[b][order]))
        return answers


def mask_id(image_id: str, prompt: Prompt, rank: int) -> str:
    """The id of a prompt set's mask (best first): derived from the image and the prompt, so the
    same request gets the same ids."""
    return hashlib.sha256(f"{image_id}|{prompt.canonical()}|{rank}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    bytes: int  # of entries and spares
    entries: int
    spares: int


class EmbeddingCache:
    """An LRU of values (embeddings, mask logits) bounded by their bytes; max_bytes 0 keeps
    nothing.

    Spares (put_spare) are values nobody has asked for yet (images encoded to segment everything
    in them, which an /embed may ask for next): they use room the entries leave, are evicted
    before any entry, oldest first, and become entries when asked for."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()  # least recently used first
        self.spares: OrderedDict[str, tuple[Any, int]] = OrderedDict()  # oldest first
        self.lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.bytes = 0

    def get(self, key: str) -> Any:
        """The value, or UnknownId."""
        with self.lock:
            if key in self.entries or key in self.spares:
                return self._hit(key)
            self.misses += 1
        raise UnknownId(key)

    def holds(self, key: str) -> bool:
        """Whether the key is cached, without counting a lookup or refreshing it."""
        with self.lock:
            return key in self.entries or key in self.spares

    def _hit(self, key: str) -> Any:
        """A cached value, counted and made the most recent entry (the lock is held)."""
        self.hits += 1
        if key in self.spares:
            self.entries[key] = self.spares.pop(key)
        self.entries.move_to_end(key)
        return self.entries[key][0]

    def put(self, key: str, value: Any, nbytes: int, keep: str | None = None) -> None:
        """Stores the value, evicting the least recently used; keep (the image whose mask logits
        these are) is moved behind it, to be evicted last."""
        with self.lock:
            if nbytes > self.max_bytes:
                return
            for held in (self.entries, self.spares):
                if key in held:
                    self.bytes -= held.pop(key)[1]
            self.entries[key] = (value, nbytes)
            self.bytes += nbytes
            if keep in self.entries:
                self.entries.move_to_end(keep)
            self._evict(self.spares, self.entries)

    def put_spare(self, key: str, value: Any, nbytes: int) -> None:
        """Stores a value nobody has asked for yet, in the room entries leave: it evicts older
        spares only, never an entry (nor a value already cached)."""
        with self.lock:
            if key in self.entries or key in self.spares or nbytes > self._room_for_spares():
                return
            self.spares[key] = (value, nbytes)
            self.bytes += nbytes
            self._evict(self.spares)  # older spares: the new one, last, fits beside the entries

    def drop_spares(self) -> int:
        """Drops every spare (memory kept only in case it is asked for: the first to give up
        when the device runs out); returns the bytes freed."""
        with self.lock:
            freed = sum(size for _, size in self.spares.values())
            self.spares.clear()
            self.bytes -= freed
            return freed

    def room_for_spares(self) -> int:
        """The bytes a spare may take: what the entries leave."""
        with self.lock:
            return self._room_for_spares()

    def _room_for_spares(self) -> int:
        return self.max_bytes - (self.bytes - sum(size for _, size in self.spares.values()))

    def _evict(self, *held: OrderedDict) -> None:
        """Evicts from the first of `held` that has values, then the next, until the values fit
        (the lock is held). Evictions counts entries (ids /segment could have asked for), not
        spares."""
        for values in held:
            while self.bytes > self.max_bytes and values:
                _, (_, freed) = values.popitem(last=False)
                self.bytes -= freed
                self.evictions += values is self.entries

    def get_or_compute(self, key: str, compute: Callable[[], Any], nbytes: Callable[[Any], int]) -> Any:
        """The cached value, or the value of compute(), stored if it fits. Callers computing the
        same key at once would each compute it: every caller runs on the model's thread (an
        encoding is a call in the worker's queue), where the second finds the first's value."""
        with self.lock:
            if key in self.entries or key in self.spares:
                return self._hit(key)
            self.misses += 1
        value = compute()
        self.put(key, value, nbytes(value))
        return value

    def stats(self) -> CacheStats:
        with self.lock:
            return CacheStats(self.hits, self.misses, self.evictions, self.bytes, len(self.entries), len(self.spares))
