"""How a script ends when stopped: Ctrl-C or SIGTERM (a time limit's, `timeout`'s) end it in
one line, from its first moment on, and by the signal itself once cleaned up (a shell reports
130 or 143, and stops a loop or script that ran it: an exit with that status reads to bash as a
stop the program handled, and its loop went on after Ctrl-C).

The standard library alone: a script calls stop_in_one_line_while_importing before its seconds
of importing torch (a Ctrl-C there printed a traceback from inside torch), and
take_over_stops when it starts its work (cli.run_script does), from when on a stop is raised
where the script is, so that its clean-up runs. server.py has its own (a stop there answers
the requests it accepted first).
"""

import atexit
import os
import signal
import sys
from typing import NoReturn


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the script is, as Ctrl-C is: its clean-up runs (temporary folders
    removed, child processes ended), where the signal's default ends the process on the spot."""


def raise_terminated(_signum, _frame) -> None:
    # A second SIGTERM, while the first one's clean-up runs (the `finally` blocks it unwinds
    # through, atexit's), ends the process at once: not a Terminated raised in the clean-up.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


# A stop's signal (a shell reports 128 + its number: 130, 143).
STOP_SIGNALS = {"Ctrl-C": signal.SIGINT, "SIGTERM": signal.SIGTERM}


def stopped_by(stop: KeyboardInterrupt) -> str:
    """What stopped a script: "SIGTERM" (raise_terminated's) or "Ctrl-C" (a key in STOP_SIGNALS)."""
    return "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"


def end_as_stopped(stop: str, clean_up: bool = True) -> NoReturn:
    """Ends the process by the stop's signal, after a normal exit's clean-up (atexit's: temporary
    folders, a Ray instance) where clean_up; the caller has said why in its line."""
    sys.stdout.flush()
    sys.stderr.flush()
    if clean_up:
        atexit._run_exitfuncs()
    signum = STOP_SIGNALS[stop]
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    os._exit(128 + signum)  # (not reached: the signal's default ends the process)


def exit_while_importing(signum: int, _frame) -> None:
    # Nothing to clean up yet, and no exception raised: one inside an import could be caught
    # there, or land in a finaliser and be lost.
    stop = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    print(f"stopped ({stop}) while starting", file=sys.stderr, flush=True)
    end_as_stopped(stop, clean_up=False)


def stop_in_one_line_while_importing() -> None:
    """Until take_over_stops: Ctrl-C or SIGTERM end the script at once, in one line. A signal
    the script was started with ignored (Ctrl-C in a shell's background job) stays ignored."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(signum, exit_while_importing)


def take_over_stops() -> None:
    """From here on, Ctrl-C raises KeyboardInterrupt and SIGTERM Terminated where the script is
    (a SIGTERM the script was started with ignored stays ignored)."""
    if signal.getsignal(signal.SIGINT) is exit_while_importing:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, exit_while_importing):
        signal.signal(signal.SIGTERM, raise_terminated)
