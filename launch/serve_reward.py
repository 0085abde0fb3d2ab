"""Serve one reward over HTTP: ``python -m launch.serve_reward reward=<name> [host=127.0.0.1] [port=8000]``.

``reward`` picks ``conf/reward/<name>.yaml`` (its keys are overridable: ``reward.quality=80``); the
reward is built the way training builds it (``weight`` dropped, ``hydra.utils.instantiate`` on the
rest) and served with the protocol of rewards/protocol.py until Ctrl-C or SIGTERM. Train against it
with ``+reward@rewards.<name>=remote rewards.<name>.url=http://127.0.0.1:8000``.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

TOKEN_ENV = "STEERFLOW_REWARD_TOKEN"


@dataclass
class ServeConfig:
    reward: Any = MISSING  # conf/reward/<name>.yaml, chosen with reward=<name>
    name: Optional[str] = None  # reported in /v1/health and error messages; default: <name> of reward=<name>
    host: str = "127.0.0.1"  # loopback: only this machine can connect
    port: int = 8000  # 0 picks a free port (printed at start-up)
    allow_remote: bool = False  # required to bind a host other machines can reach
    token: Optional[str] = None  # bearer token clients must send; default: $STEERFLOW_REWARD_TOKEN if set
    max_batch: int = 64  # most images per reward call
    batch_wait_ms: float = 5.0  # most the batcher waits for requests the server is still receiving
    max_request_mb: float = 64.0  # larger bodies get 413 (1 MB = 2**20 bytes)
    max_image_pixels: int = 4096 * 4096
    cache_size: int = 4096  # dedup cache entries; 0 turns deduplication off (stochastic or stateful rewards)
    torch_threads: int = 1  # intra-op threads of the reward's torch ops (the batcher is one thread)
    request_timeout_s: float = 60.0


ConfigStore.instance().store(name="serve_reward_schema", node=ServeConfig)


def build_server(cfg: ServeConfig):
    """The reward of ``cfg.reward`` behind a bound (not yet serving) server; what the CLI runs."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from rewards.server import ServerOptions, make_server

    if cfg.torch_threads < 1:
        raise ValueError(f"torch_threads ({cfg.torch_threads}) must be >= 1")
    # Deliberate, not the core count: the server often shares its machine with trainers or other servers.
    torch.set_num_threads(cfg.torch_threads)
    spec = OmegaConf.to_container(cfg.reward, resolve=True) if OmegaConf.is_config(cfg.reward) else dict(cfg.reward)
    # The ensemble's keys, not the constructor's (as RewardEnsemble pops them).
    spec.pop("weight", None)
    spec.pop("role", None)
    name = cfg.name or spec["_target_"].rsplit(".", 1)[-1]
    try:
        reward = instantiate(spec)
    except Exception as e:
        raise RuntimeError(f"could not build reward {name!r} from {spec}: {e}") from e
    token = cfg.token if cfg.token is not None else os.environ.get(TOKEN_ENV) or None
    options = ServerOptions(
        max_batch=cfg.max_batch, batch_wait_ms=cfg.batch_wait_ms, cache_size=cfg.cache_size,
        max_request_bytes=int(cfg.max_request_mb * 2**20), max_image_pixels=cfg.max_image_pixels, token=token,
        request_timeout_s=cfg.request_timeout_s,
    )
    return make_server(reward, name, cfg.host, cfg.port, cfg.allow_remote, options)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@hydra.main(config_path="../conf", config_name="serve_reward", version_base="1.3")
def _main(dcfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    cfg: ServeConfig = OmegaConf.to_object(dcfg)
    cfg.name = cfg.name or HydraConfig.get().runtime.choices.get("reward")
    server = build_server(cfg)
    health = server.service.health()
    # The first line is the contract with scripts (and tests) that start a server on port=0.
    print(f"serving reward {health['reward']!r} ({health['target']}) at {server.url}", flush=True)
    print(f"  POST {server.url}/v1/score, GET {server.url}/v1/health, GET {server.url}/v1/metrics; "
          f"max_batch={cfg.max_batch}, max_request_mb={cfg.max_request_mb:g}, "
          f"token {'required' if health['auth'] else 'not required'}", flush=True)
    # SIGTERM (kill, SLURM, docker stop) ends like Ctrl-C: the port is released and the batcher stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("reward server stopping", flush=True)
    finally:
        server.close()


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
