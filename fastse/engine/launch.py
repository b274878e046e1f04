"""Processes launched by torchrun (one per GPU, one or several nodes): joining the group, the device, failing together.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a plain
`python` launch has none of them and runs as a single process, where every helper here is a no-op.
The collectives and rank queries the run uses once joined are `fastse.distributed`'s.
On several nodes (`torchrun --nnodes N --rdzv-backend c10d`) what is per node goes by the local rank:
the GPU (cuda:LOCAL_RANK), and the data each node prepares in its own cache (local rank 0 first);
global rank 0 alone writes the run folder, which every node reads when it resumes.

Failing together: a rank that raises calls `abort(error)`, which posts the error in the process
group's key-value store; a watchdog thread on every rank polls that key once a second and ends its
process (exit code 1, one line naming the failed rank) whatever collective it is blocked in. So an
exception in one rank (bad data, out of memory) ends all ranks within about a second, under any
backend and launcher, instead of leaving them in a collective until the 30-minute timeout (NCCL
never notices a peer that stopped calling); the failed rank itself is ended if leaving the group
hangs for 15 s. A rank killed outright (kill -9, the OOM killer) posts nothing: torchrun then ends
the others; with gloo they also fail at their next collective.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from fastse.distributed import Dist, is_initialized


def launch_env(device: str = "auto") -> Dist:
    """This process's place as the launcher set it (or as an existing process group has it) and its
    device (`auto`: cuda:LOCAL_RANK when CUDA is present, else cpu), without joining a group or
    touching a GPU: settings can be checked first. Without torchrun: rank 0 of 1. Without
    LOCAL_WORLD_SIZE (a launcher other than torchrun) all processes are taken to share this node."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but CUDA is not available")
        if world > 1 and local >= (gpus := torch.cuda.device_count()):
            raise ValueError(f"LOCAL_RANK={local}, but this node has {gpus} GPU(s): start at most {gpus} "
                             "process(es) a node (torchrun --nproc-per-node)")
        dev = torch.device("cuda", local if dev.index is None or world > 1 else dev.index)
    return Dist(rank=rank, world_size=world, local_rank=local, local_world_size=local_world, device=dev)


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU), start the watchdog that ends this
    process when another rank calls `abort`, and select this process's device (see `launch_env`)."""
    env = launch_env(device)
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.world_size > 1 and not dist.is_initialized():
        # 30 min collective timeout: the other ranks wait at a barrier while rank 0 alone runs the kNN monitor
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo", init_method="env://",
                                rank=env.rank, world_size=env.world_size,
                                device_id=env.device if env.device.type == "cuda" else None,
                                timeout=datetime.timedelta(minutes=30))
        _start_watchdog(env.rank, env.world_size)
    return env


def cleanup() -> None:
    """Stop the watchdog and leave the process group."""
    _stop_watchdog()
    if is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- failing together

_POLL_S = 1.0  # how often a watchdog reads the store
_ACK_WAIT_S = 5.0  # how long a failed rank waits for the others to hear it before it goes on failing
_EXIT_GRACE_S = 15.0  # a failed rank still running this long later (a teardown that hangs) is ended
_generation = 0  # groups made by this process: each uses fresh keys (torchrun's store outlives a group)


class _Watchdog(threading.Thread):
    def __init__(self, store: dist.Store, rank: int, world: int):
        super().__init__(name="fastse-watchdog", daemon=True)
        self.store, self.rank, self.world = store, rank, world
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(_POLL_S):
            try:
                if not self.store.check(["abort"]):
                    continue
                message = self.store.get("abort").decode()
                self.store.set(f"ack/{self.rank}", "1")
            except Exception:  # the store is gone (its host process ended): nothing left to watch
                return
            if not self.stopped.is_set():  # else this rank is failing itself (`abort`) or done
                print(f"[rank {self.rank}] stopping: {message}", file=sys.stderr, flush=True)
                time.sleep(0.2)  # the failed rank reads the ack before this process (maybe the store host) ends
                os._exit(1)


_watchdog: _Watchdog | None = None


def _start_watchdog(rank: int, world: int) -> None:
    global _watchdog, _generation
    _generation += 1
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"fastse/{restart}/{_generation}", dist.distributed_c10d._get_default_store())
    _watchdog = _Watchdog(store, rank, world)
    _watchdog.start()


def _stop_watchdog() -> _Watchdog | None:
    global _watchdog
    watchdog, _watchdog = _watchdog, None
    if watchdog is not None:
        watchdog.stopped.set()
        if watchdog is not threading.current_thread():
            watchdog.join()
    return watchdog


def abort(error: BaseException) -> None:
    """Tell the other ranks that this one failed with `error`: their watchdogs end their processes
    within about a second. Waits (at most a few seconds) until they have heard it, so the message
    reaches them before this process's exit breaks their connections; the caller then re-raises and
    should leave the group (`cleanup`). This process is ended too if it still runs 15 s later (a
    process group whose teardown waits for the ranks that are gone). A no-op in one process or when
    the group was not made by `init_distributed`."""
    watchdog = _stop_watchdog()
    if watchdog is None:
        return
    store, rank = watchdog.store, watchdog.rank
    timer = threading.Timer(_EXIT_GRACE_S, _force_exit, (rank,))
    timer.daemon = True
    timer.start()
    text = str(error).strip().splitlines()
    message = f"rank {rank} failed: {type(error).__name__}" + (f": {text[0][:300]}" if text else "")
    try:
        if store.compare_set("abort", "", message).decode() != message:  # another rank failed first
            store.set(f"ack/{rank}", "1")
            return
        others = [f"ack/{r}" for r in range(watchdog.world) if r != rank]
        deadline = time.monotonic() + _ACK_WAIT_S
        while not store.check(others) and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # the store is gone: the others are ending anyway
        pass


def _force_exit(rank: int) -> None:
    print(f"[rank {rank}] still running {_EXIT_GRACE_S:.0f} s after it failed (leaving the process group hangs): "
          "ending it", file=sys.stderr, flush=True)
    os._exit(1)
