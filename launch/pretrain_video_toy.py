"""Pre-train the video toy (pixel-space Wan, moving shapes).

  python -m launch.pretrain_video_toy OUT [STEPS] [INIT_FROM]     train (INIT_FROM: continue from a model folder)
  python -m launch.pretrain_video_toy ship MODEL DEST RUN...      copy MODEL to DEST with its card and samples

Training writes ``OUT/model`` (a Wan diffusers folder, transformer in fp16) and ``OUT/history.json``
(held-out direction accuracy). Shipping re-scores the copy and writes a card listing each RUN (oldest
first) with the command recorded in its ``command.txt``. One CPU thread, batch 32: the shipped base's
1000 + 1500 steps took minutes each on the shared 2-core machine (times on its card).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> None:
    import torch

    from models.toy.video import pretrain, ship

    torch.set_num_threads(1)
    if argv and argv[0] == "ship":
        model, dest, runs = Path(argv[1]), Path(argv[2]), [Path(r) for r in argv[3:]]
        stages = [((r / "command.txt").read_text().strip(), json.loads((r / "history.json").read_text())) for r in runs]
        print(json.dumps(ship(model, dest, stages)))
        return
    out = Path(argv[0] if argv else "runs/pretrain_video_toy")
    steps = int(argv[1]) if len(argv) > 1 else 1000
    init_from = Path(argv[2]) if len(argv) > 2 else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text("python -m launch.pretrain_video_toy " + " ".join(argv) + "\n")
    pretrain(out, steps=steps, init_from=init_from)


if __name__ == "__main__":
    main(sys.argv[1:])
