#!/usr/bin/env bash
# The study on Modal H100s: deploy deploy/modal_app.py, replay an image list through every chosen
# mode, collect one RLE line per image and mode, stop the app, compare each mode with the
# baseline (compare_rle_lists.py).
#
#   bash modal_experiments.sh IMAGE_PATHS OUTPUT_DIR [MODEL_TYPE] [MODES]
#   bash modal_experiments.sh image_paths results large "baseline ao fast fast_furious"
#
# Needs the modal CLI logged in (modal token new). The checkpoint is uploaded to the Volume from
# CHECKPOINT_DIR (default ~/checkpoints/sam2; models/ for micro) unless the Volume holds the same
# bytes already (or CHECKPOINT_DIR has none and the Volume has one). Fast modes load
# exported packages from EXPORTED_DIR/<mode> when that folder exists (made with `server.py ...
# --fast --save-fast DIR --cpu-target x86-64-v3` on an H100 machine, so that any container's CPU
# runs them: docs/fast-modes.md); otherwise each container compiles. Exits 1 if a
# mode's replay (every image of it answered an error) or a comparison failed (after making the others).
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    usage
    exit 0
fi
if [[ $# -lt 2 || $# -gt 4 ]]; then
    usage >&2
    echo "error: expected IMAGE_PATHS OUTPUT_DIR [MODEL_TYPE] [MODES], got $# arguments" >&2
    exit 2
fi
paths_file=$1
output_dir=$2
model_type=${3:-large}
modes=${4:-baseline ao fast fast_furious}
checkpoint_dir=${CHECKPOINT_DIR:-$HOME/checkpoints/sam2}
exported_dir=${EXPORTED_DIR:-exported}
app_name=sam2-segment-everything
volume=sam2-checkpoints
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}

if ! command -v modal >/dev/null; then
    echo "error: the modal command is not installed (pip install -r requirements.txt; then modal token new)" >&2
    exit 1
fi
# The app is the module deploy.modal_app of this repository.
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
read -r -a mode_list <<< "$modes"
if [[ ${#mode_list[@]} -eq 0 ]]; then
    echo "error: no mode given; choose among baseline ao fast fast_furious" >&2
    exit 1
fi
# Checked before the first paid second: the model type (its checkpoint's file name, from the
# project's own table of sizes, which knows t, s, b+, l), every mode, every listed image.
checkpoint_name=$("$python" - "$model_type" "$paths_file" ${mode_list[@]+"${mode_list[@]}"} <<'EOF'
import sys
from sam2serve.checkpoints import model_size
from sam2serve.cli import checked_image_paths
from sam2serve.modes import get_mode
try:
    name = model_size(sys.argv[1]).filename
    for mode in sys.argv[3:]:
        get_mode(mode)
        if sys.argv[3:].count(mode) > 1:
            raise ValueError(f"mode {mode!r} given twice")
    checked_image_paths(sys.argv[2])
except (ValueError, OSError) as error:
    sys.exit(f"error: {error}")
print(name)
EOF
)
# The project's own micro model is committed in models/: its folder unless CHECKPOINT_DIR says otherwise.
if [[ -z ${CHECKPOINT_DIR:-} && $checkpoint_name == sam2.1_hiera_micro.pt ]]; then
    checkpoint_dir=$here/models
fi
mkdir -p "$output_dir"

# Deploying creates the volume on a new account; the uploads need it.
modal deploy -m deploy.modal_app
# Stop the app however this script ends.
trap 'modal app stop -y "$app_name" >/dev/null 2>&1 || true; rm -f "${local_sum_file:-}"' EXIT

# The long steps run as children that a stop (Ctrl-C, SIGTERM sent to this script alone) ends
# before the app is stopped: a replay left running would go on writing its output.
child=
run_step() {
    "$@" &
    child=$!
    local status=0
    wait "$child" || status=$?
    child=
    return "$status"
}
# shellcheck disable=SC2329  # called by the traps below
stop_step() { if [[ -n $child ]]; then kill -TERM "$child" 2>/dev/null || true; wait "$child" || true; fi; }
trap 'stop_step; exit 130' INT
trap 'stop_step; exit 143' TERM

# The checkpoint on the volume is this machine's where it has one: its SHA-256 is kept beside it
# (NAME.sha256), and a checkpoint of the same name but other bytes (trained again) is sent again.
sum_file=checkpoints/$checkpoint_name.sha256
if [[ -f "$checkpoint_dir/$checkpoint_name" ]]; then
    sha256='import hashlib, sys; print(hashlib.file_digest(open(sys.argv[1], "rb"), "sha256").hexdigest())'
    local_sum=$("$python" -c "$sha256" "$checkpoint_dir/$checkpoint_name")
    # (modal writes a line of its own after the file's bytes)
    volume_sum=$(modal volume get "$volume" "$sum_file" - 2>/dev/null | grep -m1 -xE '[0-9a-f]{64}' || true)
    if [[ $volume_sum != "$local_sum" ]]; then
        echo "uploading $checkpoint_dir/$checkpoint_name to the volume $volume"
        # The old SHA-256 first: an upload cut short must not leave it beside other bytes.
        modal volume rm "$volume" "$sum_file" >/dev/null 2>&1 || true
        run_step modal volume put --force "$volume" "$checkpoint_dir/$checkpoint_name" "checkpoints/$checkpoint_name"
        local_sum_file=$(mktemp)
        echo "$local_sum" > "$local_sum_file"
        # After the checkpoint: an upload cut short is sent again.
        modal volume put --force "$volume" "$local_sum_file" "$sum_file"
        rm -f "$local_sum_file"
    fi
# Piped, modal lists one path per line; the whole name, not a leftover partial upload of it.
elif ! modal volume ls "$volume" checkpoints 2>/dev/null | grep -qxF -e "checkpoints/$checkpoint_name" -e "$checkpoint_name"; then
    echo "error: $checkpoint_name is neither on the volume $volume nor in $checkpoint_dir (CHECKPOINT_DIR)" >&2
    exit 1
fi

# A step stopped (Ctrl-C, SIGTERM: status 130, 143) stops the study; one that failed does not.
exit_if_stopped() { if (($1 == 130 || $1 == 143)); then exit "$1"; fi; }

failed_modes=" "
for mode in "${mode_list[@]}"; do
    load_fast=()
    if [[ ($mode == fast || $mode == fast_furious) && -d "$exported_dir/$mode" ]]; then  # the fast modes' alone
        run_step modal volume put --force "$volume" "$exported_dir/$mode" "exported/$mode"
        load_fast=(--load-fast "$mode")
    fi
    echo "replaying $paths_file through $mode"
    # A mode whose replay fails (its containers failed at start: kernels exported for another
    # model) leaves the other modes to run.
    # (${a[@]+...}: an empty array under set -u in bash before 4.4, as macOS's)
    replayed=0
    run_step "$python" -m deploy.modal_app replay "$paths_file" "$output_dir/$mode/rle_masks" \
        --model-type "$model_type" --mode "$mode" ${load_fast[@]+"${load_fast[@]}"} || replayed=$?
    exit_if_stopped "$replayed"
    if ((replayed != 0)); then
        echo "warning: the replay through $mode failed (above); going on with the other modes" >&2
        failed_modes+="$mode "
    fi
done

modal app stop -y "$app_name"
trap - EXIT

if [[ ! " ${mode_list[*]} " =~ " baseline " ]]; then
    echo "no baseline among the modes: the masks are in $output_dir, nothing compared"
    [[ $failed_modes == " " ]] || exit 1
    exit 0
fi
status=0
[[ $failed_modes == " " ]] || status=1
if [[ $failed_modes == *" baseline "* ]]; then
    echo "error: the baseline's replay failed: nothing to compare the modes with" >&2
    exit 1
fi
for mode in "${mode_list[@]}"; do
    [[ $mode == baseline ]] && continue
    if [[ $failed_modes == *" $mode "* ]]; then
        echo "== $mode vs baseline: not compared, its replay failed"
        continue
    fi
    echo "== $mode vs baseline"
    compared=0
    run_step "$python" "$here/compare_rle_lists.py" "$output_dir/baseline/rle_masks" "$output_dir/$mode/rle_masks" \
        || compared=$?
    exit_if_stopped "$compared"
    ((compared == 0)) || status=1
done
exit "$status"
