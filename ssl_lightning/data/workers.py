"""Loader workers that outlive a scheduler's stop signal, so that the training process can finish its batch and save."""
from __future__ import annotations

import os
import signal
import threading


def survive_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the data module's loaders: the worker ignores SIGTERM from anyone but its parent,
    and SIGUSR1.

    Schedulers send SIGTERM to every process of a job (SLURM, ``scancel``, a process-group kill), loader workers
    included. torch's worker exits quietly on its parent's SIGTERM but dies of anyone else's, and the training
    process then fails ("DataLoader worker ... is killed by signal: Terminated") before
    :class:`~ssl_lightning.callbacks.PreemptionCheckpoint` can save. Here the worker keeps serving batches; the
    loader stops it as usual (its shutdown, or the parent's ``terminate()``: still a quiet exit, as torch's).

    Where ``signal.sigwaitinfo`` (the sender's pid) is missing (macOS), torch's behaviour is kept.
    """
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # blocked in every thread: the watcher receives it

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=watch, name="sigterm-watch", daemon=True).start()
