"""Several named rewards, weighted and summed; every component is reported separately."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from hydra.utils import instantiate


@dataclass
class RewardResult:
    """total [B]: the weighted sum trained on; per_reward: name -> [B] (unweighted);
    components: "name/component" -> [B] for rewards that report components."""

    total: torch.Tensor
    per_reward: dict[str, torch.Tensor]
    components: dict[str, torch.Tensor]

    @staticmethod
    def cat(parts: list["RewardResult"]) -> "RewardResult":
        """Concatenate the results of consecutive chunks; a component missing from a chunk is NaN there."""
        def column(get, key):
            return torch.cat([get(p).get(key, torch.full((len(p.total),), float("nan"))) for p in parts])

        names = list(dict.fromkeys(k for p in parts for k in p.per_reward))
        comps = list(dict.fromkeys(k for p in parts for k in p.components))
        return RewardResult(
            total=torch.cat([p.total for p in parts]),
            per_reward={k: column(lambda p: p.per_reward, k) for k in names},
            components={k: column(lambda p: p.components, k) for k in comps},
        )


class RewardEnsemble:
    """Instantiate ``{name: {_target_: ..., weight: w, **kwargs}}`` and score with all of them.

    Rewards run concurrently in threads (most release the GIL in numpy/cv2/torch ops), or each in its
    own worker process with ``executor: process`` (rewards/worker.py; ``timeout_s`` bounds each call);
    a failure is re-raised with the reward's name so it is never a silent hang or an anonymous traceback.
    """

    def __init__(self, specs: dict[str, dict]):
        self.weights: dict[str, float] = {}
        self.regularizers: set[str] = set()  # role: regularizer (added to advantages unnormalised)
        self.rewards = {}
        for name, spec in specs.items():
            spec = dict(spec)
            self.weights[name] = float(spec.pop("weight", 1.0))
            role = spec.pop("role", "reward")
            if role not in ("reward", "regularizer"):
                raise ValueError(f"rewards.{name}.role={role!r}: use 'reward' or 'regularizer'")
            if role == "regularizer":
                self.regularizers.add(name)
            executor = spec.pop("executor", "thread")
            timeout_s = spec.pop("timeout_s", None)
            if executor not in ("thread", "process"):
                raise ValueError(f"rewards.{name}.executor={executor!r}: use 'thread' or 'process'")
            if timeout_s is not None and executor != "process":
                raise ValueError(f"rewards.{name}.timeout_s is read only with executor=process (set that, or drop "
                                 "timeout_s; a remote reward has its own timeout knobs)")
            if executor == "process":
                from rewards.worker import ProcessReward

                self.rewards[name] = ProcessReward(name, spec, 600.0 if timeout_s is None else float(timeout_s))
                continue
            try:
                self.rewards[name] = instantiate(spec)
            except Exception as e:
                raise RuntimeError(f"could not build reward {name!r} from {spec}: {e}") from e
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.rewards)), thread_name_prefix="reward")
        # One thread scores submitted chunks in order while the caller keeps sampling (submit()).
        self._chunks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-chunks")

    @property
    def chunkable(self) -> bool:
        """Whether scoring chunk by chunk equals scoring the whole batch (no reward compares samples)."""
        return not any(getattr(r, "needs_whole_groups", False) for r in self.rewards.values())

    def check_prompts(self, prompts: list[str], source: str, key: str = "rewards") -> None:
        """Ask every reward that can (those defining ``check_prompts``) whether it can score `prompts`,
        before the first rollout; a refusal is re-raised as ValueError naming the reward and `source`."""
        for name, reward in self.rewards.items():
            if hasattr(reward, "check_prompts"):
                try:
                    reward.check_prompts(prompts)
                except ValueError as e:
                    raise ValueError(f"reward {name!r} ({key}.{name}) cannot score {source}: {e}") from e

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> Future:
        """Score in the background (a Future of RewardResult): rollout of the next chunk overlaps this one.

        A failure surfaces from ``future.result()`` as the same RuntimeError naming the reward.
        """
        return self._chunks.submit(self, images.detach().cpu().clone(), list(prompts), metadata)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> RewardResult:
        images = images.detach().float().cpu()
        futures = {name: self._pool.submit(r, images, prompts, metadata) for name, r in self.rewards.items()}
        per_reward, components = {}, {}
        for name, fut in futures.items():
            try:
                out = fut.result()
            except Exception as e:
                raise RuntimeError(f"reward {name!r} failed on a batch of {len(prompts)}: {e}") from e
            if isinstance(out, dict):
                for key, value in out.items():
                    if key != "reward":
                        components[f"{name}/{key}"] = torch.as_tensor(value).float()
                out = out["reward"]
            out = torch.as_tensor(out).float().reshape(-1)
            if out.shape[0] != len(prompts):
                raise RuntimeError(f"reward {name!r} returned {out.shape[0]} scores for {len(prompts)} images")
            per_reward[name] = out
        # Monitors (weight 0) stay out of the sum: 0 * NaN would turn a monitor's gap into a NaN total.
        trained = [self.weights[n] * r for n, r in per_reward.items() if self.weights[n] != 0]
        total = sum(trained) if trained else torch.zeros(len(prompts))
        return RewardResult(total=total, per_reward=per_reward, components=components)

    def close(self) -> None:
        """Stop worker processes (rewards with executor=process) and the scoring threads."""
        for r in self.rewards.values():
            if hasattr(r, "close"):
                r.close()
        self._pool.shutdown(wait=False)
        self._chunks.shutdown(wait=False)

    def state_dict(self) -> dict:
        """State of the rewards that change during training (those defining ``state_dict``), by name."""
        return {n: r.state_dict() for n, r in self.rewards.items() if hasattr(r, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(n for n, r in self.rewards.items() if hasattr(r, "state_dict") and n not in state)
        if missing:
            raise KeyError(f"the checkpoint holds no state for reward(s) {missing}; they were added after it was saved")
        for name, s in state.items():
            self.rewards[name].load_state_dict(s)
