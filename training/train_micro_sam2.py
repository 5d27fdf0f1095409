r"""Trains the micro SAM2.1 on generated scenes, then evaluates it on scenes it never saw.

The micro configuration of sam2serve.checkpoints (the SAM2.1 architecture, 2.7 M parameters,
256-pixel input), trained as SAM is trained (point and box prompts inside objects, best-of-three
mask loss, IoU head), its mask logits calibrated for sam2's stability score, and saved as
models/sam2.1_hiera_micro.pt. Seeded. Run from the repository's root:

    python -m training.train_micro_sam2                   # 8000 steps, about 67 min on 2 quiet CPU cores
    python -m training.train_micro_sam2 --evaluate-only   # held-out figures of the saved model
    python -m training.train_micro_sam2 --steps 20 --output /tmp/trial/sam2.1_hiera_micro.pt   # a trial
    python -m training.train_micro_sam2 --init models/sam2.1_hiera_micro.pt --photo-share 0.6 \
        --steps 2000 --lr 5e-4 --output /tmp/photo/sam2.1_hiera_micro.pt   # on photo-like scenes

The recipe, what made it learn from scratch, and the held-out figures: docs/micro-model.md.
"""

import argparse
import logging
import math
import shlex
import sys
import time
from pathlib import Path

if not __package__:  # run by its path (python training/train_micro_sam2.py): this checkout's packages, as -m has them
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam2serve.stops import stop_in_one_line_while_importing

if __name__ == "__main__":  # before the seconds of importing torch: a stop then ends the script in one line
    stop_in_one_line_while_importing()

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_erosion
from tqdm import tqdm

from sam2serve.amg import image_predictor
from sam2serve.checkpoints import (
    DEFAULT_CHECKPOINT_DIR, MODEL_SIZES, build_random_model, load_model, model_size, save_checkpoint,
)
from sam2serve.cli import (
    ScriptParser, non_negative_int, number_type, positive_int, require_output_file, run_script, seed,
    set_up_logging,
)
from sam2serve.model import ImageEncoder, point_prompt_embeddings
from sam2serve.preprocess import image_to_input
from training.evaluation import best_mask_logits, evaluate, tight_box
from training.photo_scenes import make_photo_scene
from training.scenes import Scene, make_scene

log = logging.getLogger("train_micro_sam2")

DEFAULT_OUTPUT = DEFAULT_CHECKPOINT_DIR / MODEL_SIZES["micro"].filename  # the committed model
TRAIN_SEED_OFFSET = 1_000_000  # training scenes come from seeds far from the held-out ones
CALIBRATION_SEED_OFFSET = 2_000_000  # so do the scenes that set the logit scale
EDGE_BAND_PIXELS = 0.125  # after calibration, logits cross [-1, 1] within this many input pixels
FOCAL_WEIGHT = 20.0  # SAM's 20:1 focal:dice ratio
BACKGROUND_PROMPT_SHARE = 0.1  # some prompts fall on the background, whose mask is "the rest"
BOX_JITTER = 0.1  # box corners move by this share of the box's side (SAM's box noise)
LOSS_RESOLUTION = 128  # masks are compared at twice the decoder's 64x64 output (see training_step)


def sample_prompts(
    rng: np.random.Generator, masks: np.ndarray, n_points: int, background_share: float = BACKGROUND_PROMPT_SHARE
) -> tuple[np.ndarray, np.ndarray]:
    """Points inside objects (and some on the background) with the mask each one asks for.

    Returns (n_points, 2) pixel coordinates (x, y) and (n_points, H, W) target masks.
    """
    regions = list(masks)
    background = ~masks.any(axis=0)
    points, targets = [], []
    for _ in range(n_points):
        if background.any() and (not regions or rng.random() < background_share):
            region = background
        else:
            region = regions[rng.integers(len(regions))]
        ys, xs = np.nonzero(region)
        pick = rng.integers(len(ys))
        points.append((xs[pick] + 0.5, ys[pick] + 0.5))
        targets.append(region)
    return np.array(points, dtype=np.float32), np.stack(targets)


def jittered_boxes(rng: np.random.Generator, masks: np.ndarray) -> np.ndarray:
    """(N, H, W) masks -> (N, 4) XYXY boxes around them (tight_box), each corner moved by a little noise."""
    boxes = []
    for mask in masks:
        x0, y0, x1, y1 = tight_box(mask)
        side = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dtype=np.float32)
        boxes.append(np.array([x0, y0, x1, y1], dtype=np.float32) + rng.normal(0, BOX_JITTER, 4) * side)
    return np.clip(np.array(boxes, dtype=np.float32), 0, masks.shape[-1])


def draw_scene(rng: np.random.Generator, image_size: int, photo_share: float) -> tuple[Scene, bool]:
    """A photo-like scene with probability photo_share (none drawn from rng when 0: generated-only
    runs keep their random stream), else a generated one; and whether it is photo-like."""
    photo_like = photo_share > 0 and rng.random() < photo_share
    return (make_photo_scene if photo_like else make_scene)(rng, image_size, image_size), photo_like


def training_batch(step: int, seed: int, n_images: int, n_points: int, image_size: int, photo_share: float = 0.0):
    """Scenes for one step, from seeds that depend only on (seed, step): reproducible. A share
    `photo_share` of them look like photographs (training/photo_scenes.py); their backgrounds are
    photos with unlabelled content, so no prompt asks for "the rest" there.

    Returns images (B, 3, R, R), and per prompt its point (B, K, 2), the box around its target
    (B, K, 4) and the target (B, K, R, R); each prompt is used as a point or as a box.
    """
    rng = np.random.default_rng([seed + TRAIN_SEED_OFFSET, step])
    images, points, boxes, targets = [], [], [], []
    for _ in range(n_images):
        scene, photo_like = draw_scene(rng, image_size, photo_share)
        p, t = sample_prompts(rng, scene.masks, n_points, 0.0 if photo_like else BACKGROUND_PROMPT_SHARE)
        images.append(image_to_input(scene.image, image_size))
        points.append(torch.from_numpy(p))
        boxes.append(torch.from_numpy(jittered_boxes(rng, t)))
        targets.append(torch.from_numpy(t))
    return torch.cat(images), torch.stack(points), torch.stack(boxes), torch.stack(targets)


class GeneratedBatches(torch.utils.data.Dataset):
    """training_batch for each step, made in a worker process while the model trains on the
    previous one (drawing scenes is about a third of a step on 2 cores)."""

    def __init__(self, seed: int, n_images: int, n_points: int, image_size: int, photo_share: float,
                 photo_from: int = 0):
        self.seed, self.n_images, self.n_points, self.image_size = seed, n_images, n_points, image_size
        self.photo_share, self.photo_from = photo_share, photo_from

    def __getitem__(self, step: int):
        share = self.photo_share if step >= self.photo_from else 0.0  # generated scenes first
        return training_batch(step, self.seed, self.n_images, self.n_points, self.image_size, share)


def single_threaded(_worker_id: int) -> None:
    torch.set_num_threads(1)  # the worker draws scenes; the training loop keeps the cores


def batches(args: argparse.Namespace, image_size: int) -> torch.utils.data.DataLoader:
    """The steps' batches in order, one worker ahead of the training loop."""
    return torch.utils.data.DataLoader(
        GeneratedBatches(args.seed, args.images_per_step, args.points_per_image, image_size, args.photo_share,
                         args.photo_from),
        batch_size=None,
        sampler=range(args.steps),
        num_workers=1,
        prefetch_factor=2,
        worker_init_fn=single_threaded,
    )


def decode_prompts(model, image_embed, high_res, points: torch.Tensor | None, boxes: torch.Tensor | None):
    """All four decoder outputs (single mask + three multimask) for (B, K, 2) points or
    (B, K, 4) boxes, already in the model's input frame (scenes are square)."""
    prompts = points if points is not None else boxes
    n_points = prompts.shape[1]
    if points is not None:
        sparse, dense = point_prompt_embeddings(model.sam_prompt_encoder, points.reshape(-1, 2))
    else:
        # As SAM2ImagePredictor (and so /segment) sends a box: its corners as points labelled 2
        # and 3, plus the padding point the prompt encoder adds when it is given no box.
        corners = boxes.reshape(-1, 2, 2)
        labels = torch.tensor([[2, 3]], dtype=torch.int, device=corners.device).expand(len(corners), 2)
        sparse, dense = model.sam_prompt_encoder(points=(corners, labels), boxes=None, masks=None)
    repeat = lambda x: x.repeat_interleave(n_points, dim=0)  # noqa: E731
    masks, iou_preds, _, _ = model.sam_mask_decoder.predict_masks(
        image_embeddings=repeat(image_embed),
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        repeat_image=False,
        high_res_features=[repeat(f) for f in high_res],
    )
    return masks, iou_preds  # (B*K, 4, h, w), (B*K, 4)


def mask_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per mask focal+dice loss and true IoU. logits (N, M, h, w); targets (N, h, w), the share
    of each pixel inside the object (soft at edges); the IoU counts pixels at least half inside."""
    targets = targets[:, None].expand_as(logits)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    focal = (ce * (1 - p_t) ** 2 * (0.25 * targets + 0.75 * (1 - targets))).mean(dim=(2, 3))
    dice = 1 - (2 * (prob * targets).sum(dim=(2, 3)) + 1) / (prob.sum(dim=(2, 3)) + targets.sum(dim=(2, 3)) + 1)
    predicted, inside = (logits > 0).float(), (targets >= 0.5).float()
    intersection = (predicted * inside).sum(dim=(2, 3))
    union = predicted.sum(dim=(2, 3)) + inside.sum(dim=(2, 3)) - intersection
    iou = intersection / union.clamp(min=1)
    return FOCAL_WEIGHT * focal + dice, iou


def training_step(model, images, points, boxes, targets) -> torch.Tensor:
    """Loss of one batch: the first half of each image's prompts as points, the rest as boxes."""
    image_embed, feat_s0, feat_s1 = ImageEncoder(model)(images)
    half = points.shape[1] // 2
    point_logits, point_ious = decode_prompts(model, image_embed, [feat_s0, feat_s1], points[:, :half], None)
    box_logits, box_ious = decode_prompts(model, image_embed, [feat_s0, feat_s1], None, boxes[:, half:])
    logits, iou_preds = torch.cat([point_logits, box_logits]), torch.cat([point_ious, box_ious])
    targets = torch.cat([targets[:, :half].flatten(0, 1), targets[:, half:].flatten(0, 1)])
    # Masks are compared as they are used: logits upscaled bilinearly (here to LOSS_RESOLUTION),
    # against the share of each pixel inside the object, so edges can fall between pixels.
    logits = F.interpolate(logits, size=(LOSS_RESOLUTION, LOSS_RESOLUTION), mode="bilinear", align_corners=False)
    targets = F.adaptive_avg_pool2d(targets[:, None].float(), LOSS_RESOLUTION)[:, 0]
    losses, true_iou = mask_losses(logits, targets)
    # Multimask outputs: only the best of the three is penalised (SAM's ambiguity-aware loss).
    mask_loss = losses[:, 1:].min(dim=1).values.mean() + losses[:, 0].mean()
    iou_loss = F.mse_loss(iou_preds, true_iou.detach())
    return mask_loss + iou_loss


def zero_feature_projections(model) -> None:
    """Starts the image embedding and the decoder's high-resolution features at zero (see the top)."""
    neck = model.image_encoder.neck
    # neck.convs runs coarsest level first; scalp drops the coarsest, the next makes the embedding.
    embedding_levels = [level.conv for level in neck.convs[:2]]
    projections = embedding_levels + [model.sam_mask_decoder.conv_s0, model.sam_mask_decoder.conv_s1]
    with torch.no_grad():
        for conv in projections:
            conv.weight.zero_()
            conv.bias.zero_()


def median_edge_slope(model, seed: int, n_scenes: int = 20, photo_share: float = 0.0) -> float:
    """Median rise of the chosen mask's logits per input pixel, across true object edges.

    Measured on scenes (generated, and a share photo_share of photo-like ones) that neither
    training nor the held-out evaluation uses, with
    one interior point per object and sam2's image predictor (the mask with the highest
    predicted IoU, logits upsampled to the input size as the mask generator upsamples them).
    """
    predictor, slopes = image_predictor(model), []
    for index in tqdm(range(n_scenes), desc="calibrating the logits", unit="scene"):
        rng = np.random.default_rng([seed + CALIBRATION_SEED_OFFSET, index])
        scene, _ = draw_scene(rng, model.image_size, photo_share)
        for mask, logit in zip(scene.masks, best_mask_logits(predictor, scene)):
            edge = mask ^ binary_erosion(mask)  # the object's own border pixels
            gy, gx = np.gradient(logit)
            slopes.append(np.hypot(gx, gy)[edge])
    return float(np.median(np.concatenate(slopes)))


@torch.inference_mode()
def calibrate_logit_scale(model, seed: int, photo_share: float = 0.0) -> float:
    """Scales the mask logits so that their [-1, 1] band is EDGE_BAND_PIXELS wide at edges.

    Training leaves the logits soft: masks are right at threshold 0, but rise slowly across
    edges, and sam2's stability score (the IoU of the masks thresholded at -1 and +1) reads
    that as unstable. The masks are linear in the output hypernetworks' last layer, so
    multiplying it by k multiplies every mask logit by k: the same masks at 0, the same IoU
    predictions, a band k times thinner. Returns k.
    """
    scale = 2.0 / (EDGE_BAND_PIXELS * median_edge_slope(model, seed, photo_share=photo_share))
    scale_mask_logits(model, scale)
    return scale


@torch.no_grad()
def scale_mask_logits(model, factor: float) -> None:
    """Multiplies every mask logit by `factor` (the output hypernetworks' last layer)."""
    for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
        mlp.layers[-1].weight.mul_(factor)
        mlp.layers[-1].bias.mul_(factor)


def trained_start(path: Path):
    """A trained checkpoint to go on from, its calibration undone: training continues on the
    logits it learnt, and calibrate_logit_scale runs again at the end."""
    model = load_model(path, "micro", "cpu").model
    meta = torch.load(path, map_location="cpu", weights_only=True).get("training", {})
    scale_mask_logits(model, 1.0 / meta.get("logit_scale", 1.0))
    return model


def save_trained(model, path: Path, meta: dict) -> None:
    """Official format ("model" holds the state dict), written atomically. Tensors are stored
    in float16 to keep the committed file under 10 MB; loading copies them into float32."""
    weights = {name: value.half() if value.is_floating_point() else value for name, value in model.state_dict().items()}
    save_checkpoint({"model": weights, "training": meta}, path)


# A loss this many times the first step's, or not finite, ends the run before its weights replace
# --output (a learning rate of 1e30 wrote NaN weights over the committed model, and said so).
DIVERGED_LOSS_RATIO = 100


class TrainingDiverged(RuntimeError):
    pass


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    if args.init is None:
        model = build_random_model(model_size("micro"), args.seed)
        zero_feature_projections(model)
    else:
        model = trained_start(args.init)
    model.train()
    image_size = model.image_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = min(100, args.steps // 10)

    def learning_rate(step: int) -> float:  # linear warm-up, then cosine decay to 1%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)

    def diverged(what: str) -> TrainingDiverged:
        return TrainingDiverged(f"the training diverged: {what} (--lr {args.lr:g} is too high; the default is "
                                f"1e-3); {args.output} was left as it was")

    def require_sane_loss(loss: float, when: str) -> None:
        if not math.isfinite(loss) or loss > DIVERGED_LOSS_RATIO * first:
            raise diverged(f"loss {loss:.4g} {when}, from {first:.4g} at the first step")
    started, running, first, first_batch = time.perf_counter(), None, None, None
    progress = tqdm(batches(args, image_size), total=args.steps, desc="training", unit="step")
    saved_steps = 0  # in the interim weights of this run
    try:
        for step, batch in enumerate(progress):
            loss = training_step(model, *batch)
            first, first_batch = first or loss.item(), first_batch or batch
            require_sane_loss(loss.item(), f"at step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            progress.set_postfix(loss=f"{running:.3f}")
            if (step + 1) % args.save_every == 0 and step + 1 < args.steps:  # interim weights
                save_trained(model, interim_path(args.output), {"steps_done": step + 1})
                saved_steps = step + 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: an hour of training is not lost
        if saved_steps:
            path = interim_path(args.output)
            log.info("the weights after %d of %d steps are in %s: go on from them with --init %s (a new run, "
                     "with --steps the steps left)", saved_steps, args.steps, path, path)
        raise
    minutes = (time.perf_counter() - started) / 60
    meta = {key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items() if key != "output"}
    with torch.no_grad():  # the last step's update, made after its loss was checked
        require_sane_loss(training_step(model, *first_batch).item(), "on the first step's batch after the last")
    scale = calibrate_logit_scale(model.eval(), args.seed, args.photo_share)
    if not math.isfinite(scale):
        raise diverged(f"the mask logits' calibration gave a scale of {scale}")
    meta.update(minutes=round(minutes, 1), torch=str(torch.__version__), logit_scale=round(scale, 3))
    save_trained(model, args.output, meta)
    interim_path(args.output).unlink(missing_ok=True)
    log.info("trained %d steps in %.1f min, mask logits calibrated by k = %.1f, wrote %s", args.steps, minutes,
             scale, args.output)  # (the runs docs/micro-model.md compares by their k)


def interim_path(output: Path) -> Path:
    """Where interim weights go during training: beside the output, never over it (an interrupted
    run leaves the model at --output as it was; --init starts a new run from the interim file,
    with a new schedule and optimizer)."""
    return output.with_name(output.stem + ".interim" + output.suffix)


def prompt_count(text: str) -> int:
    """argparse type of --points-per-image: at least one point and one box."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be 2 or more (half points, half boxes), got {value}")
    return value


# --photo-share: a number from 0 to 1.
share = number_type(float, "a number from 0 to 1", lambda value: 0 <= value <= 1, "from 0 to 1")


# AdamW moves each weight by about the learning rate per step: above 1, the first steps diverge
# (and past float32's range torch's optimiser ends in a traceback).
learning_rate = number_type(float, "a number", lambda value: 0 < value <= 1, "above 0 and at most 1")


def main() -> None:
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help="the trained checkpoint, written when training ends (the default is the committed "
                        "model, the server's default: give another path for a trial); with --evaluate-only, "
                        "the checkpoint evaluated")
    parser.add_argument("--steps", type=positive_int, default=8000, help="training steps")
    parser.add_argument("--images-per-step", type=positive_int, default=4, help="scenes in each step's batch")
    parser.add_argument("--points-per-image", type=prompt_count, default=16,
                        help="prompts drawn in each scene: half as points, half as boxes")
    parser.add_argument("--lr", type=learning_rate, default=1e-3,
                        help="peak learning rate (AdamW, warm-up, cosine decay)")
    parser.add_argument("--seed", type=seed, default=0,
                        help="seed of the weights, the scenes and the prompts")
    parser.add_argument("--photo-share", type=share, default=0.0,
                        help="share of training scenes that look like photographs (training/photo_scenes.py)")
    parser.add_argument("--photo-from", type=non_negative_int, default=0,
                        help="first step with photo-like scenes (generated scenes only before it)")
    parser.add_argument("--init", help="start from this trained micro checkpoint's weights instead of random ones "
                        "(a new run: new schedule and optimizer)")
    parser.add_argument("--save-every", type=positive_int, default=250,
                        help="steps between interim checkpoints, written beside --output as <name>.interim.pt")
    parser.add_argument("--eval-scenes", type=positive_int, default=50, help="held-out scenes for the figures")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="no training: the held-out figures of the checkpoint at --output")
    args = parser.parse_args()
    for option, given in (("--output", args.output), ("--init", args.init)):  # Path("") is the current folder
        if given is not None and not str(given).strip():
            parser.error(f"{option}: empty; give a file")
    # expanduser: a quoted ~ too
    args.output, args.init = Path(args.output).expanduser(), args.init and Path(args.init).expanduser()
    if args.init and not args.init.is_file():
        parser.error(f"--init {args.init}: no such file")
    if args.evaluate_only and not args.output.is_file():
        parser.error(f"--output {args.output}: no such file to evaluate")
    if args.output.is_dir():
        parser.error(f"--output {args.output}: a folder; give the checkpoint's file name")
    if not args.evaluate_only:  # found now, not after an hour of training
        require_output_file(parser, args.output, "--output", folder_made=True)
        if args.photo_share > 0 and args.photo_from >= args.steps:
            parser.error(f"--photo-from {args.photo_from}: at or after --steps {args.steps}, "
                         "so no step would see the photo-like scenes of --photo-share")
    set_up_logging("%(message)s")
    if not args.evaluate_only:
        try:
            train(args)
        except TrainingDiverged as error:
            sys.exit(f"error: {error}")
    loaded = load_model(args.output, "micro", "cpu")
    result = evaluate(loaded.model, n_scenes=args.eval_scenes)
    print(result.table())
    if not args.evaluate_only:
        log.info(serving_hint(args.output))


def serving_hint(output: Path) -> str:
    """How to serve a checkpoint written here: server.py takes a folder and finds the micro model
    in it by its official file name."""
    filename, quoted = model_size("micro").filename, lambda path: shlex.quote(str(path))  # pasted into a shell
    serve = f"python server.py {quoted(output.parent)} micro"
    if output.name == filename:
        return f"serve it: {serve}"
    return (f"serve it: the server finds it as {filename} in its folder: mv {quoted(output)} "
            f"{quoted(output.parent / filename)}; {serve}")


if __name__ == "__main__":
    run_script(main)
