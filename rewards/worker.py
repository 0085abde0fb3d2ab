"""A reward in its own worker process (``rewards.<name>.executor=process``).

Why: a reward that holds the GIL (pure-Python scoring, tokenisers) or sets its own thread pools stalls
the rollout even from a thread; a process does not. The worker is started with the ``spawn`` method
(no inherited CUDA context or locks), builds the reward from its config, and answers calls over a pipe.
Within this machine, process-to-process, the arguments travel with multiprocessing's pickling; the
HTTP reward server (rewards/server.py) is the way across machines and never unpickles.

Failure is never a hang: a call waits in slices of ``POLL_S`` and checks that the worker is alive; a
worker that died, timed out (``timeout_s``) or raised surfaces as a RuntimeError naming the reward.
"""
from __future__ import annotations

import multiprocessing as mp
import time
import traceback

import torch

POLL_S = 0.2
START_TIMEOUT_S = 600.0  # start-up imports torch and may load weights: bounded separately from calls


def _serve(spec: dict, conn, threads: int) -> None:
    """Worker main: build the reward, report its attributes, then answer (method, args) requests."""
    torch.set_num_threads(threads)
    try:
        from hydra.utils import instantiate

        reward = instantiate(spec)
        conn.send(("ok", {
            "input_kind": getattr(reward, "input_kind", "pixels"),
            "needs_whole_groups": bool(getattr(reward, "needs_whole_groups", False)),
            "stateful": hasattr(reward, "state_dict"),
            "checks_prompts": hasattr(reward, "check_prompts"),
        }))
    except Exception:  # noqa: BLE001 - every failure goes back to the trainer, with its traceback
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            method, args = conn.recv()
        except EOFError:  # the trainer closed the pipe: exit quietly
            return
        if method == "close":
            return
        if method == "check_prompts":  # a refusal is an answer (its message), not a worker failure
            try:
                reward.check_prompts(*args)
                conn.send(("ok", None))
            except ValueError as e:
                conn.send(("ok", str(e)))
            except Exception:  # noqa: BLE001
                conn.send(("error", traceback.format_exc()))
            continue
        try:
            conn.send(("ok", getattr(reward, method)(*args) if method != "__call__" else reward(*args)))
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


class ProcessReward:
    """The reward built from ``spec`` (a config with ``_target_``) living in a spawned process.

    Same call contract as the reward itself; ``differentiable`` is False (gradients cannot cross a
    process boundary). ``timeout_s`` bounds every call; start-up (imports, weights) gets START_TIMEOUT_S.
    """

    differentiable = False

    def __init__(self, name: str, spec: dict, timeout_s: float = 600.0, threads: int = 1):
        self.name, self.timeout_s = name, timeout_s
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # spawn hands the child this process's sys.path, so it imports the same packages.
        self._proc = ctx.Process(target=_serve, args=(spec, child, threads), name=f"reward-{name}", daemon=True)
        self._proc.start()
        child.close()
        info = self._receive("start-up", START_TIMEOUT_S)
        self.input_kind = info["input_kind"]
        self.needs_whole_groups = info["needs_whole_groups"]
        if info["stateful"]:
            self.state_dict = lambda: self._call("state_dict")
            self.load_state_dict = lambda state: self._call("load_state_dict", state)
        if info.get("checks_prompts"):
            self.check_prompts = self._check_prompts

    def _check_prompts(self, prompts: list[str]) -> None:
        """The reward's own prompt check, run in the worker; its refusal is raised here as ValueError."""
        refusal = self._call("check_prompts", list(prompts))
        if refusal:
            raise ValueError(refusal)

    def _receive(self, what: str, timeout_s: float | None = None):
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(POLL_S):
            if not self._proc.is_alive():
                raise RuntimeError(f"reward {self.name!r}: its worker process died (exit code {self._proc.exitcode}) "
                                   f"during {what}; run it with executor=thread to see the failure in-process")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise RuntimeError(f"reward {self.name!r}: no answer from its worker process within "
                                   f"{timeout_s} s (rewards.{self.name}.timeout_s={self.timeout_s}) during {what}; the worker was killed")
        try:
            status, value = self._conn.recv()
        except EOFError as e:  # the worker exited: its end of the pipe closed
            self._proc.join(timeout=5)
            raise RuntimeError(f"reward {self.name!r}: its worker process died (exit code {self._proc.exitcode}) during "
                               f"{what}; run it with executor=thread to see the failure in-process") from e
        if status == "error":
            raise RuntimeError(f"reward {self.name!r} failed in its worker process during {what}:\n{value}")
        return value

    def _call(self, method: str, *args):
        if not self._proc.is_alive():
            raise RuntimeError(f"reward {self.name!r}: its worker process is not running (exit code {self._proc.exitcode})")
        self._conn.send((method, args))
        return self._receive(method)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None):
        return self._call("__call__", images.detach().cpu(), list(prompts), metadata)

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("close", ()))
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()
