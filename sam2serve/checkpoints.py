"""SAM2.1 checkpoints: model sizes, download, random initialisation and loading.

The only module that talks to `sam2.build_sam` (and so to Hydra). Checkpoints are the official
files `sam2.1_hiera_{tiny,small,base_plus,large}.pt`, a dict whose "model" entry is the state
dict. Random-initialised checkpoints use the same format plus a "random_init" entry, so loading
them goes through the same code and the server can say loudly that the weights are random.

Write a random checkpoint (for tests, or to try the server without the download):

    python -m sam2serve.checkpoints ~/checkpoints/random tiny --seed 0
"""

import functools
import glob
import hashlib
import logging
import os
import shlex
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .stops import stop_in_one_line_while_importing

if __name__ == "__main__":  # (python -m sam2serve.checkpoints) before the seconds of importing torch
    stop_in_one_line_while_importing()

import torch
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base
from tqdm import tqdm

log = logging.getLogger(__name__)

DOWNLOAD_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
# The model served when no checkpoint is given (server.py, Ray, the bulk job): the project's
# own micro SAM2.1, trained by training/train_micro_sam2.py and committed (6 MB), so a new user can
# segment an image right after installing, with no download.
DEFAULT_CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "models"
DEFAULT_MODEL_TYPE = "micro"
RANDOM_WEIGHTS_DIR = "~/checkpoints/random"  # where a message suggests writing random weights (README's too)
# A download's partial file untouched this long belongs to a process that was killed (a live one
# writes as data arrives, and gives up after 30 s without any): the next download removes it.
STALE_PARTIAL_S = 600


@dataclass(frozen=True)
class ModelSize:
    name: str
    config: str  # a config name inside the sam2 package
    filename: str
    overrides: tuple[str, ...] = ()  # Hydra overrides applied to that config
    official: bool = True  # published by Meta (downloadable); else the project's own


# The project's own "micro" SAM2.1: the tiny config with smaller widths and depths and a 256
# input (2.7 M parameters), trained by training/train_micro_sam2.py on generated scenes. Same
# architecture and code path as the official sizes; only the numbers differ. The decoder is
# 128 wide (the neck's d_model): at 64 its mask read-out had 8 channels and its attention heads
# 4 dimensions. The memory modules are only used for video, which this project does not
# segment; they stay at 64 wide.
MICRO_OVERRIDES = (
    "++model.image_size=256",
    "++model.image_encoder.trunk.embed_dim=24",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[8,4,8,4]",
    "++model.image_encoder.neck.d_model=128",
    "++model.image_encoder.neck.backbone_channel_list=[192,96,48,24]",
    "++model.memory_attention.d_model=64",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=64",
    "++model.memory_attention.layer.dim_feedforward=256",
    "++model.memory_attention.layer.self_attention.embedding_dim=64",
    "++model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.embedding_dim=64",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=32",
    "++model.memory_encoder.out_dim=32",
    "++model.memory_encoder.in_dim=64",
    "++model.memory_encoder.position_encoding.num_pos_feats=32",
    "++model.memory_encoder.mask_downsampler.embed_dim=64",
    "++model.memory_encoder.fuser.layer.dim=64",
)


MODEL_SIZES = {
    size.name: size
    for size in [
        ModelSize("tiny", "configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
        ModelSize("small", "configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
        ModelSize("base_plus", "configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
        ModelSize("large", "configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
        ModelSize("micro", "configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_micro.pt", MICRO_OVERRIDES,
                  official=False),
    ]
}
# The study's command line says "plus"; sam2's file names say "base_plus" and its configs "b+".
MODEL_TYPE_ALIASES = {"plus": "base_plus", "b+": "base_plus", "t": "tiny", "s": "small", "l": "large"}
MODEL_TYPE_CHOICES = sorted(MODEL_SIZES) + sorted(MODEL_TYPE_ALIASES)


class CheckpointError(Exception):
    """A checkpoint that cannot be had or used; the message says what to do."""


class CheckpointUnavailable(CheckpointError, RuntimeError):
    """A checkpoint is missing and could not be downloaded, or cannot be read."""


class WrongCheckpoint(CheckpointError, ValueError):
    """A file that is not a SAM2.1 checkpoint of the size asked for: unreadable by torch, without
    a "model" entry, or with tensors that do not fit."""


@dataclass(frozen=True)
class LoadedModel:
    model: SAM2Base
    size: ModelSize
    path: Path
    random_seed: int | None  # None for trained weights

    @functools.cached_property
    def weights(self) -> str:
        """What the weights are, for people (GET /health, the web page): "random", "demo" (the
        project's committed micro model, trained on generated scenes, wherever its file is) or
        "trained" (an official checkpoint, or a micro model trained again)."""
        if self.random_seed is not None:
            return "random"
        committed = DEFAULT_CHECKPOINT_DIR / self.size.filename
        if self.size.name == DEFAULT_MODEL_TYPE and committed.is_file() and (
                self.path.resolve() == committed.resolve() or file_sha256(self.path) == file_sha256(committed)):
            return "demo"
        return "trained"

    @property
    def description(self) -> str:
        weights = "trained" if self.random_seed is None else f"RANDOM (seed {self.random_seed})"
        return f"SAM2.1 {self.size.name} from {self.path.name}, {weights} weights"  # the path only in the log


def model_size(model_type: str) -> ModelSize:
    """Looks a model type up by name (tiny, small, base_plus, large, the project's micro) or by one of
    MODEL_TYPE_ALIASES (plus, b+, t, s, l)."""
    name = MODEL_TYPE_ALIASES.get(model_type, model_type)
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model type {model_type!r}; choose one of {MODEL_TYPE_CHOICES}")
    return MODEL_SIZES[name]


def build_random_model(size: ModelSize, seed: int, device: str = "cpu") -> SAM2Base:
    """The SAM2.1 architecture of that size with seeded random weights (no file involved)."""
    torch.manual_seed(seed)
    return build_model(size, device)


def build_model(size: ModelSize, device: str = "cpu") -> SAM2Base:
    """The SAM2.1 architecture of that size, weights as initialised."""
    # apply_postprocessing=False: the study's (and the AMG's) setting; it only affects
    # single-mask outputs, which the mask generator uses only to refine (use_m2m). Prompts set
    # sam2's default meanwhile (interactive.sam2_prompt_settings).
    return build_sam2(
        size.config,
        ckpt_path=None,
        device=device,
        apply_postprocessing=False,
        hydra_overrides_extra=list(size.overrides),
    )


def write_random_checkpoint(directory: str | os.PathLike, model_type: str, seed: int = 0) -> Path:
    """Writes a deterministic random-initialised checkpoint in the official format."""
    size = model_size(model_type)
    path = Path(directory).expanduser() / size.filename
    model = build_random_model(size, seed)
    save_checkpoint({"model": model.state_dict(), "random_init": {"seed": seed, "model_type": size.name}}, path)
    return path


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """torch.save beside the target, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, suffix=".partial", delete=False)
    try:
        with tmp:  # (its last bytes are written as it closes)
            torch.save(checkpoint, tmp)
        os.chmod(tmp.name, 0o644)  # a temporary file is private; a checkpoint is not
        os.replace(tmp.name, path)
    except BaseException:  # a full disk, Ctrl-C: no half file left behind
        Path(tmp.name).unlink(missing_ok=True)
        raise


def ensure_checkpoint(
    directory: str | os.PathLike, model_type: str, base_url: str = DOWNLOAD_BASE_URL
) -> Path:
    """Returns the checkpoint's path, downloading the official file if it is missing."""
    size = model_size(model_type)
    directory = Path(directory).expanduser()
    path = directory / size.filename
    if path.is_file():
        return path
    if directory.is_file():
        folder = f": give {directory.parent}" if directory.name == size.filename else ""
        if directory.name not in {known.filename for known in MODEL_SIZES.values()}:  # trained, named otherwise
            folder = (f": name the file so (mv {shlex.quote(str(directory))} "
                      f"{shlex.quote(str(directory.parent / size.filename))}) and give its folder")
        raise CheckpointUnavailable(f"{directory} is a file; the checkpoint argument is the folder that holds "
                                    f"{size.filename}{folder}")
    if path.exists():  # a folder of that name (an unpacked archive, say): a download could not replace it
        raise CheckpointUnavailable(f"{path} is not a file (a folder?); the checkpoint is the file "
                                    f"{size.filename} in {directory}")
    if not size.official:
        raise CheckpointUnavailable(
            f"Checkpoint {path} is missing. The {size.name} model is the project's own: it is "
            f"committed as models/{size.filename}, or train it again with\n"
            f"    python -m training.train_micro_sam2 --output {path}"
        )
    url = f"{base_url}/{size.filename}"
    log.info("%s not found, downloading %s", path, url)
    try:
        _download(url, path)
    except (urllib.error.URLError, OSError, ValueError) as error:  # ValueError: not a URL (--checkpoint-url)
        raise CheckpointUnavailable(
            f"Checkpoint {path} is missing and could not be downloaded from {url} ({error}).\n"
            f"Fetch it by hand on a machine that is online:\n"
            f"    mkdir -p {directory} && curl -L -o {path} {url}\n"
            f"or try it on random weights (they find no object), in a folder of their own, not beside "
            f"real ones:\n    python -m sam2serve.checkpoints {RANDOM_WEIGHTS_DIR} {size.name}   # then give "
            f"{RANDOM_WEIGHTS_DIR} instead of {directory}"
        ) from error
    return path


def require_checkpoint_pair(directory: str | os.PathLike | None, model_type: str | None) -> None:
    """A checkpoint folder and a model type come together; neither means the default model."""
    if (directory is None) != (model_type is None):
        raise ValueError("give both a checkpoint folder and a model type, or neither for the default model")
    if directory is not None and not str(directory).strip():  # an unset variable, say: not the current folder
        raise ValueError("the checkpoint folder is empty; give a folder (. for the current one)")


def resolve_checkpoint(
    directory: str | os.PathLike | None, model_type: str | None, base_url: str = DOWNLOAD_BASE_URL
) -> tuple[Path, str]:
    """(path, model type) of the checkpoint to serve: the given one (downloaded if missing),
    or with neither argument the project's trained micro model."""
    require_checkpoint_pair(directory, model_type)
    if directory is None:
        directory, model_type = DEFAULT_CHECKPOINT_DIR, DEFAULT_MODEL_TYPE
    return ensure_checkpoint(directory, model_type, base_url), model_type


def remove_stale_partials(path: Path) -> None:
    """Removes the partial files of path's downloads that a killed process left (SIGKILL, a
    container's grace period run out): up to a checkpoint's size each. A download in progress
    elsewhere keeps its file: it is written to as data arrives."""
    for partial in path.parent.glob(f"{glob.escape(path.name)}.*.partial"):
        try:
            if time.time() - partial.stat().st_mtime > STALE_PARTIAL_S:
                partial.unlink()
                log.info("removed %s, left by a download that was stopped", partial)
        except FileNotFoundError:  # removed by another process meanwhile
            pass
        except OSError as error:  # another user's, in a shared folder: not this download's business
            log.warning("could not remove %s: %s", partial, error)


def _download(url: str, path: Path) -> None:
    """url -> path, its folder made once the server answers; a failed download leaves no file.
    A connection closed early reads as the end of the file: the length the server announced is
    checked, so that a cut download never becomes a checkpoint."""
    with urllib.request.urlopen(url, timeout=30) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".", suffix=".partial",
                                         delete=False) as tmp:
            try:
                with tqdm(total=total, unit="B", unit_scale=True, desc=path.name) as progress:
                    while chunk := response.read(1 << 20):
                        tmp.write(chunk)
                        progress.update(len(chunk))
                if total is not None and progress.n != total:
                    raise OSError(f"the download stopped after {progress.n} of {total} bytes")
            except BaseException:
                os.unlink(tmp.name)
                raise
    os.chmod(tmp.name, 0o644)  # a temporary file is private; a checkpoint is not (a shared folder's readers)
    os.replace(tmp.name, path)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def checkpoint_identity(path: Path) -> str:
    """File name and the start of its SHA-256: what exported kernels and image ids are bound to."""
    return f"{path.name}#{file_sha256(path)[:16]}"


def load_weights(model: torch.nn.Module, state_dict: dict, mismatch: str) -> torch.nn.Module:
    """Loads a state dict strictly; a WrongCheckpoint starting with `mismatch` says what does not fit."""
    mismatch = f"{mismatch} (is it a checkpoint of another size?)"
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # tensors of other shapes
        raise WrongCheckpoint(f"{mismatch}: {str(error)[:500]}") from error
    if missing or unexpected:
        raise WrongCheckpoint(
            f"{mismatch}: {len(missing)} missing tensors (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model


def make_current(device: str | torch.device) -> None:
    """Makes a CUDA device given by number (cuda:1) this thread's current one: sam2 puts some
    tensors on "cuda", the current device, whatever the model's (its position encodings' cache,
    filled while the model is built, and its rotary frequencies), and so do torch's own calls
    that take no device. Call it on the thread that builds and runs the model, before building."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def load_model(path: str | os.PathLike, model_type: str, device: str) -> LoadedModel:
    """Builds the model of that size and loads the checkpoint's weights, strictly."""
    make_current(device)
    size = model_size(model_type)
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:  # not there: for the caller (a download, or its own message)
        raise
    except OSError as error:  # unreadable (its permissions, a folder): one line, not a traceback
        raise CheckpointUnavailable(f"{path} cannot be read: {error.strerror or error}") from error
    except Exception as error:  # noqa: BLE001 (torch.load's errors for a file it cannot read are of many kinds)
        raise WrongCheckpoint(f"{path} is not a torch checkpoint, or it is damaged (torch.load: "
                              f"{type(error).__name__}); if it was downloaded, delete it and download it again") \
            from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise WrongCheckpoint(f"{path} is not a SAM2 checkpoint: it has no 'model' entry")
    model = load_weights(build_model(size), checkpoint["model"], f"{path} does not fit SAM2.1 {size.name}")
    random_init = checkpoint.get("random_init")
    loaded = LoadedModel(
        model=model.to(device).eval(),
        size=size,
        path=path,
        random_seed=None if random_init is None else int(random_init["seed"]),
    )
    if loaded.random_seed is not None:
        log.warning(
            "\n%s\n  %s\n  Masks from random weights are meaningless (none pass sam2's default thresholds; a"
            " few without them).\n%s",
            "!" * 78, loaded.description, "!" * 78,
        )
    return loaded


def holds_random_weights(path: Path) -> bool:
    """Whether a checkpoint file was written by write_random_checkpoint (read without loading its
    tensors' data)."""
    try:
        return "random_init" in torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable, not a checkpoint: not random weights either
        return False


def main() -> None:
    from .cli import ScriptParser, require_output_folder, seed  # (cli imports this module)

    parser = ScriptParser(description="Write a random-initialised SAM2.1 checkpoint.")
    parser.add_argument("directory", help="folder to write sam2.1_hiera_<size>.pt into")
    parser.add_argument("model_type", choices=MODEL_TYPE_CHOICES)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--force", action="store_true", help="replace a checkpoint of other weights (trained, "
                        "official) of that name there")
    args = parser.parse_args()
    directory = require_output_folder(parser, args.directory, "directory")
    path = directory / model_size(args.model_type).filename
    if path.exists() and not args.force and not holds_random_weights(path):
        parser.error(f"{path} holds weights that are not random ones (trained, official, or not a checkpoint): "
                     "give a folder of their own (as ~/checkpoints/random), or --force to replace them")
    print(write_random_checkpoint(directory, args.model_type, args.seed))


if __name__ == "__main__":
    from .cli import run_script

    run_script(main)
