"""Pre-train the video toy (pixel-space Wan, moving shapes):
``python -m launch.pretrain_video_toy [out] [steps] [init_from]`` (init_from: continue from a model folder).

Writes ``out/model`` (a Wan diffusers folder, transformer in fp16) and ``out/history.json`` (held-out
direction accuracy). The shipped base is ``out/model`` copied to models/toy/weights/video16 with its card.
One CPU thread: about 10 minutes for the default 600 steps of batch 32 on an idle core.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> None:
    import torch

    from models.toy.video import pretrain

    torch.set_num_threads(1)
    out = Path(argv[0] if argv else "runs/pretrain_video_toy")
    steps = int(argv[1]) if len(argv) > 1 else 600
    init_from = Path(argv[2]) if len(argv) > 2 else None
    pretrain(out, steps=steps, init_from=init_from)


if __name__ == "__main__":
    main(sys.argv[1:])
