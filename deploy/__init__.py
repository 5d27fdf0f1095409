"""The server and the study beyond one machine: Modal, Ray Serve and a Ray Data job."""

import logging

log = logging.getLogger(__name__)


def cluster_device() -> str:
    """The default device of Ray workers: cuda where the Ray cluster this process is connected
    to has GPUs, else cpu. The machine that starts a job or an application (a head node, a
    laptop) may have none. Not connected (`serve run module:build`, which builds the application
    before it connects): this machine's, said in the log where that is the CPU."""
    import ray  # here, as torch (sam2serve.cli) below: importing deploy.modal_app needs neither

    from sam2serve.cli import default_device

    if ray.is_initialized():
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    device = default_device()
    if device == "cpu":
        log.warning("no GPU on this machine and no Ray cluster connected yet: replicas run on the CPU "
                    "(device=cuda asks for the cluster's GPUs)")
    return device
