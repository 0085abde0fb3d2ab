"""Bad inputs and faults, tried the way a careless user meets them: each is a clear, named error (or a
documented acceptance), and nothing is lost.

Most cases run in-process (config composed with ``hydra.compose`` exactly as ``launch.train`` does,
checkpoints sealed by the trainer's own ``seal``) so the default tier stays fast; a few go through
the real CLI to pin the exit code and the one-message output. These are plumbing tests: there is no
math here, only "this input gives that error and leaves those files as they were".
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from safetensors.torch import save_file

from jobs import ROOT, SMALL, job_env
from trainer.checkpoint import COMPLETE_FILE, CheckpointError, check_files, save_checkpoint, seal
from trainer.config import ConfigError, register, validate
from trainer.distributed import World
from trainer.errors import EXIT_USER_ERROR, UserError, reporting_user_errors
from trainer.prompts import PromptsError, load_prompts
from trainer.resume import ConfigDriftError, prepare_resume

register()
CONF = ROOT / "conf"
WORLD = World(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
TOY = ["experiment=toy_shapes"]
GUIDE = "{_target_: samplers.guidance.LatentTarget, target: 1.0}"
# One config per algorithm schema that validates as is; each algorithm's own knobs are tried on its own.
BASES = {
    "grpo": TOY,
    "ddpo": [*TOY, "algorithm=ddpo"],
    "dense_grpo": [*TOY, "algorithm=dense_grpo"],
    "tp_grpo": [*TOY, "algorithm=tp_grpo"],
    "dual_grpo": [*TOY, "algorithm=dual_grpo", f"algorithm.process_reward={GUIDE}"],
    "dpo": [*TOY, "algorithm=dpo"],
    "grpo_guard": [*TOY, "algorithm=grpo_guard"],
    "nft": [*TOY, "algorithm=nft"],
    "prdp": [*TOY, "algorithm=prdp"],
    "reward_backprop": ["experiment=none", "model=toy_shapes", "data=shapes", "algorithm=reward_backprop",
                        "sampler=ode", "+reward@rewards.bright=brightness", "rewards.bright.weight=1"],
}
# Keys whose 0 is legal, with what it means (as the README and the schema comments document it).
# Every other numeric key must refuse 0, and every numeric key must refuse -1. Keys added on other
# branches are listed here ahead of the merge (absent keys are simply not tried).
ZERO_IS_LEGAL = {
    "seed", "sampler.guidance_scale", "sampler.start_step", "sampler.window_start",
    "sampler.reward_guidance_scale", "algorithm.max_grad_norm", "algorithm.kl_beta", "algorithm.ema_ramp",
    "algorithm.ema_max", "deepspeed.zero_stage", "data.eval_size", "train.steps", "train.eval_every",
    "train.save_every", "train.keep_last", "train.grid_every", "train.num_threads", "train.ema_decay",
    "train.onpolicy_tolerance",
    # sampler.noise_level 0 is legal for a deterministic sampler, but every base here trains log-probs
    # (reward_backprop uses sampler=ode, which has no noise_level): refused, and named, for them.
    # sampler.window_start_max 0 is legal with sampler.window=random only (the bases use fixed).
}
# Where an algorithm's own rule refuses a 0 that is legal elsewhere.
ZERO_REFUSED_BY = {("prdp", "algorithm.kl_beta")}  # PRDP regresses (r_i - r_j) / kl_beta


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _numeric_keys(node, prefix=""):
    """Every int/float field of the typed config (the dataclasses registered in the ConfigStore),
    enumerated from the schema itself so knobs added later are covered without editing this test."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numeric_keys(value, f"{prefix}{f.name}.")
            continue
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        if args in ([int], [float]):
            yield prefix + f.name, args[0]


def _keys_to_try():
    cases = []
    shared_done = set()
    for name, base in BASES.items():
        typed = OmegaConf.to_object(_compose(base))
        for key, kind in _numeric_keys(typed):
            own = key.startswith("algorithm.") and key not in {f"algorithm.{f}" for f in
                                                               ("group_size", "inner_epochs", "optimizer_steps_per_epoch",
                                                                "max_grad_norm")}
            if not own and key in shared_done:
                continue
            shared_done.add(key)
            cases.append((name, key, kind))
    return cases


CASES = _keys_to_try()


def test_the_schema_enumeration_sees_the_knobs_of_every_part():
    """Guards the enumeration itself (a walk that found nothing would make the next test vacuous)."""
    keys = {k for _, k, _ in CASES}
    assert {"train.micro_batch", "data.prompts_per_step", "sampler.noise_level", "algorithm.clip_range",
            "algorithm.beta", "algorithm.last_k", "data.max_prompt_chars", "train.ema_decay"} <= keys
    assert len(CASES) > 40


def test_zero_negative_and_wrong_type_for_every_numeric_key():
    """Every numeric knob of every schema: 0 and -1 go through validate() (the check the launcher runs
    before the model loads), a string through the typed config (what Hydra does with an override).
    Each is a named error, or for 0 an explicit, documented acceptance."""
    composed = {name: _compose(base) for name, base in BASES.items()}
    failures = []
    for name, key, kind in CASES:
        for value in (0, -1):
            dcfg = composed[name].copy()
            OmegaConf.update(dcfg, key, kind(value), merge=False)
            try:
                validate(OmegaConf.to_object(dcfg), 1)
                accepted, message = True, ""
            except ConfigError as e:
                accepted, message = False, str(e)
            if value == 0 and key in ZERO_IS_LEGAL and (name, key) not in ZERO_REFUSED_BY:
                if not accepted and f"{key} (" in message:
                    failures.append(f"[{name}] {key}=0 is documented as legal but refused: {message}")
            elif accepted or f"{key} (" not in message:
                failures.append(f"[{name}] {key}={value} was not refused by name: {message or 'accepted'}")
        dcfg = composed[name].copy()
        with pytest.raises(ValidationError) as info:
            OmegaConf.update(dcfg, key, "lots", merge=False)
        assert key.rsplit(".", 1)[-1] in str(info.value), (key, str(info.value))
    assert not failures, "\n".join(failures)


def test_all_problems_are_listed_at_once_and_none_crashes():
    """train.micro_batch=0 used to divide by zero inside validate(); optimizer.lr=-1 and
    data.prompts_per_step=-1 used to pass it and fail in DeepSpeed with no key named."""
    dcfg = _compose([*TOY, "train.micro_batch=0", "data.prompts_per_step=-1", "optimizer.lr=-1",
                     "optimizer.betas=[0.9,1.5]", "algorithm.group_size=0"])
    with pytest.raises(ConfigError) as info:
        validate(OmegaConf.to_object(dcfg), 1, files=True)
    msg = str(info.value)
    for named in ("train.micro_batch (0) must be > 0", "data.prompts_per_step (-1) must be > 0",
                  "optimizer.lr (-1) must be > 0", "optimizer.betas[1] (1.5) must be in [0, 1)",
                  "algorithm.group_size (0) must be >= 2"):
        assert named in msg, msg
    assert "algorithm.group_size (0) must be > 0" not in msg  # reported once, by its owner's rule


# --- the CLI: one message, exit code 2, no run directory; the traceback on request -----------------

def _cli(tmp_path, *overrides, env=None):
    return subprocess.run([sys.executable, "-m", "launch.train", f"run_dir={tmp_path / 'run'}", *SMALL, *overrides],
                          cwd=ROOT, env=env or job_env(), capture_output=True, text=True, timeout=300)


def test_cli_config_errors_are_one_message_with_exit_code_2_and_no_run_dir(tmp_path):
    bad = ["train.micro_batch=0", "data.prompts_per_step=-1", "optimizer.lr=-1"]
    proc = _cli(tmp_path, *bad)
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr
    assert proc.stderr.count("error: invalid config") == 1
    for key in ("train.micro_batch (0)", "data.prompts_per_step (-1)", "optimizer.lr (-1)"):
        assert key in proc.stderr
    assert not (tmp_path / "run").exists()
    debug = _cli(tmp_path, *bad, env=job_env(STEERFLOW_DEBUG="1"))
    assert debug.returncode == EXIT_USER_ERROR and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_a_bug_keeps_its_traceback_and_a_user_error_does_not(capsys):
    with pytest.raises(ZeroDivisionError):
        with reporting_user_errors():
            1 / 0
    with pytest.raises(SystemExit) as info:
        with reporting_user_errors():
            raise UserError("data.prompts='x': no such file")
    assert info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: data.prompts='x': no such file") and "Traceback" not in err
    with pytest.raises(SystemExit):
        with reporting_user_errors():
            raise OSError(errno.EROFS, "Read-only file system", "/ro/run/metrics.jsonl")
    err = capsys.readouterr().err
    assert "/ro/run/metrics.jsonl" in err and "read-only" in err


# --- prompts files --------------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
    ("un caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at line 1)"),
    (b"", "holds no prompts"),
    (b"\n  \n\t\n", "holds no prompts"),
    (("a red cube\n" + "x" * 100_000 + "\n").encode(), "line 2 has 100000 characters, more than data.max_prompt_chars=2000"),
])
def test_bad_prompts_files_are_named_errors(tmp_path, content, expected):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(PromptsError) as info:
        load_prompts(str(path), "data.prompts")
    msg = str(info.value)
    assert expected in msg and f"data.prompts={str(path)!r}" in msg
    assert len(msg) < 400  # a 100k-character prompt is never echoed whole


def test_prompts_edge_cases_that_are_fine_or_named(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa cat\r\nun café\r\n".encode("utf-8"))
    assert load_prompts(str(bom)) == ["a cat", "un café"]  # a BOM and CRLF line ends are plain text
    with pytest.raises(PromptsError, match="is a folder"):
        load_prompts(str(tmp_path), "data.eval_prompts")
    with pytest.raises(PromptsError, match="no such file"):
        load_prompts(str(tmp_path / "missing.txt"))
    dcfg = _compose([*TOY, f"data.prompts={bom}", "data.max_prompt_chars=3"])
    with pytest.raises(ConfigError, match="data.max_prompt_chars=3"):  # checked by validate(), before the model
        validate(OmegaConf.to_object(dcfg), 1, files=True)


# --- checkpoints: sealed, verified, falling back, never a silent restart ---------------------------

def _fake_run(run_dir: Path, steps=(1, 2), config="a: 1\n") -> list[Path]:
    """A run directory as the trainer leaves it: metrics rows, config.yaml and sealed checkpoints."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval/x": 0.5}) + "\n" for s in (0, *steps)))
    out = []
    for step in steps:
        ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
        (ckpt / "engine").mkdir(parents=True)
        torch.save({"w": torch.full((64,), float(step))}, ckpt / "engine" / "model_states.pt")
        save_file({"w": torch.full((64,), float(step))}, str(ckpt / "policy.safetensors"))
        (ckpt / "config.yaml").write_text(config)
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 1}))
        seal(ckpt, step)
        out.append(ckpt)
    return out


def _flip_a_byte(path: Path, at: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))  # same size: only a checksum can tell


def test_corrupt_newest_checkpoint_falls_back_with_a_warning_and_keeps_it_aside(tmp_path, capsys):
    first, second = _fake_run(tmp_path / "run")
    _flip_a_byte(second / "policy.safetensors")
    resume = prepare_resume("auto", tmp_path / "run", "a: 1\n", WORLD, 0)
    assert resume.checkpoint == first and resume.step == 1
    out = capsys.readouterr().out
    assert f"WARNING: checkpoint step_000002: {second / 'policy.safetensors'}: xxh3_128 checksum" in out
    assert "does not match the sealed" in out and "moved to step_000002.corrupt" in out
    assert (tmp_path / "run" / "checkpoints" / "step_000002.corrupt" / "policy.safetensors").is_file()  # kept


def test_every_checkpoint_corrupt_is_a_clear_error_that_changes_nothing(tmp_path):
    run = tmp_path / "run"
    ckpts = _fake_run(run)
    _flip_a_byte(ckpts[0] / "engine" / "model_states.pt")
    (ckpts[1] / "policy.safetensors").write_bytes((ckpts[1] / "policy.safetensors").read_bytes()[:-7])  # truncated
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError) as info:
        prepare_resume("auto", run, "a: 1\n", WORLD, 0)
    msg = str(info.value)
    assert "every checkpoint is damaged" in msg and "model_states.pt" in msg and "truncated" in msg
    assert "train.resume=fresh" in msg
    assert (run / "metrics.jsonl").read_text() == before  # no silent restart over the old metrics


def test_a_run_with_metrics_and_no_checkpoint_is_not_restarted_silently(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, steps=())
    with pytest.raises(CheckpointError, match="train.resume=fresh"):
        prepare_resume("auto", run, "a: 1\n", WORLD, 0)
    # ... and the drift check runs on that path too: the run's own config.yaml is compared first.
    with pytest.raises(ConfigDriftError, match="a: checkpoint=1, now=2"):
        prepare_resume("auto", run, "a: 2\n", WORLD, 0)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    # fresh moves the run aside (kept) and starts over.
    assert prepare_resume("fresh", run, "a: 2\n", WORLD, 0).step == 0
    assert len(list(tmp_path.glob("run.replaced-*/metrics.jsonl"))) == 1


def test_checkpoints_sealed_with_sizes_only_still_resume_with_a_note(tmp_path, capsys):
    _, second = _fake_run(tmp_path / "run")
    marker = json.loads((second / COMPLETE_FILE).read_text())
    (second / COMPLETE_FILE).write_text(json.dumps({"step": 2, "files": marker["files"]}))  # the old format
    resume = prepare_resume("auto", tmp_path / "run", "a: 1\n", WORLD, 0)
    assert resume.step == 2
    assert "sealed by an older steerflow without checksums" in capsys.readouterr().out


def test_sample_and_export_refuse_a_corrupt_policy_naming_it(tmp_path):
    from launch.export import ExportConfig, export
    from launch.sample import load_policy

    _, ckpt = _fake_run(tmp_path / "run")
    _flip_a_byte(ckpt / "policy.safetensors")
    with pytest.raises(CheckpointError, match="policy.safetensors: xxh3_128 checksum"):
        load_policy(ckpt)
    with pytest.raises(CheckpointError, match="policy.safetensors"):
        check_files(ckpt, ("config.yaml", "policy.safetensors"))
    with pytest.raises(UserError):
        export(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "export")))
    assert not (tmp_path / "export").exists()


# --- full and read-only disks -------------------------------------------------------------------

class _Engine:
    """Stands in for DeepSpeed's engine: writes its files through ``write`` (which may fail)."""

    def __init__(self, write):
        self.write = write

    def save_checkpoint(self, folder, tag, **_):
        (Path(folder) / tag).mkdir(parents=True)
        self.write(Path(folder) / tag / "mp_rank_00_model_states.pt")

    def zero_optimization_stage(self):
        return 0


class _Policy:
    def trainable_state_dict(self):
        return {"w": torch.zeros(4)}


def _save(run_dir, engine):
    return save_checkpoint(engine, _Policy(), run_dir, 3, "a: 1\n", WORLD, {"world_size": 1})


def test_a_full_disk_names_enospc_and_leaves_no_tmp_folder(tmp_path):
    def full(path):
        path.write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.raises(CheckpointError) as info:
        _save(tmp_path, _Engine(full))
    assert "ENOSPC" in str(info.value) and "mp_rank_00_model_states.pt" in str(info.value)
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no step_000003.tmp left to fill the disk


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True).returncode == 0
    return ok


def test_a_really_full_disk_through_torch_save(tmp_path):
    """torch.save reports ENOSPC as "unexpected pos ..." with no errno: the free space tells."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(CheckpointError, match="no space left"):
            _save(mnt / "run", _Engine(lambda p: torch.save(torch.zeros(1 << 20), p)))
        assert list((mnt / "run" / "checkpoints").iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)])  # lazy: a file torch.save failed on may still be open


def test_a_read_only_run_dir_is_refused_before_anything_runs(tmp_path):
    from launch.run_dir import run_dir_problems

    (tmp_path / "file").write_text("")
    assert "is a file" in run_dir_problems(tmp_path / "file")[0]
    assert run_dir_problems(tmp_path / "new" / "run") == []
    mnt = tmp_path / "ro"
    if not _mount_tmpfs(mnt, "ro,size=1m"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        problems = run_dir_problems(mnt / "run")
        assert problems and "not writable" in problems[0] and str(mnt) in problems[0]
    finally:
        subprocess.run(["umount", "-l", str(mnt)])  # lazy: a file torch.save failed on may still be open


# --- launch.sample: never writes into a non-empty out, atomically --------------------------------

def test_sample_refuses_a_non_empty_out_and_replaces_it_only_when_complete(tmp_path, monkeypatch):
    import launch.sample as sample_mod
    from launch.sample import SampleConfig, SampleError, sample

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.png").write_text("old")
    cfg = SampleConfig(checkpoint="ckpt", prompts=str(prompts), out=str(out))
    with pytest.raises(SampleError, match="overwrite=true"):
        sample(cfg)
    run_cfg = OmegaConf.create({"sampler": {"_target_": "samplers.ode.ODESampler", "num_steps": 2,
                                            "eval_num_steps": 2, "guidance_scale": 1.0}})
    monkeypatch.setattr(sample_mod, "load_policy", lambda checkpoint, device: (object(), run_cfg))

    def broken(cfg, policy, sampler, prompts, steps, guidance, folder):
        (folder / "index.jsonl").write_text("half")
        raise RuntimeError("the sampler died")

    monkeypatch.setattr(sample_mod, "_write_samples", broken)
    with pytest.raises(RuntimeError):
        sample(dataclasses.replace(cfg, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["old.png"]  # untouched by the failed sampling
    assert not list(tmp_path.glob(".out.*"))

    def fine(cfg, policy, sampler, prompts, steps, guidance, folder):
        (folder / "index.jsonl").write_text("{}\n")

    monkeypatch.setattr(sample_mod, "_write_samples", fine)
    index = sample(dataclasses.replace(cfg, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["index.jsonl"] and index == out.absolute() / "index.jsonl"


def test_sample_numeric_arguments_are_named(tmp_path):
    from launch.sample import SampleConfig, problems

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    got = problems(SampleConfig(checkpoint="c", prompts=str(prompts), out=str(tmp_path / "o"), num_per_prompt=0,
                                batch=-1, num_steps=0, guidance_scale=-1.0, noise_level=-0.5, fps=0, seed=-3))
    for named in ("num_per_prompt (0)", "batch (-1)", "num_steps (0)", "fps (0)", "guidance_scale (-1.0)",
                  "noise_level (-0.5)", "seed (-3)"):
        assert any(p.startswith(named) for p in got), (named, got)


# --- the first case, through the CLI: a finished run whose only checkpoint is damaged --------

def test_relaunching_a_finished_run_with_a_damaged_checkpoint_loses_nothing(tmp_path):
    """Used to print "starting it again from step 0", exit 0 and overwrite metrics.jsonl, summary.json
    and config.yaml, skipping the drift check. Now: the drift is refused if the config changed, and
    otherwise the damaged checkpoint is named; either way exit 2 and every file as it was."""
    run = tmp_path / "run"
    resolved = OmegaConf.to_yaml(_compose([f"run_dir={run}", *SMALL]), resolve=True)
    (ckpt,) = _fake_run(run, steps=(1,), config=resolved)
    (run / "summary.json").write_text("{}\n")
    policy = ckpt / "policy.safetensors"
    policy.write_bytes(policy.read_bytes()[:-5])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = _cli(tmp_path, "data.eval_size=8")
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    assert "data.eval_size: checkpoint=16, now=8" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli(tmp_path)
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    assert "every checkpoint is damaged" in proc.stderr and "policy.safetensors: size" in proc.stderr
    assert "train.resume=fresh" in proc.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    moved = {p.relative_to(run) for p in set(before) - set(after)}
    assert moved == {Path("checkpoints/step_000001") / p.relative_to(ckpt) for p in before if ckpt in p.parents}
    assert all(after[p] == before[p] for p in before if p in after)  # metrics, summary, config untouched
    aside = run / "checkpoints" / "step_000001.corrupt"
    assert (aside / "policy.safetensors").read_bytes() == before[policy]  # the damaged one is kept, aside


@pytest.mark.slow  # two short jobs, about 70 s: run with `make test-all`
def test_a_job_whose_newest_checkpoint_is_corrupted_resumes_from_the_previous_one(tmp_path):
    """The real trainer, end to end: two steps saved at each; the newest policy.safetensors is
    corrupted without changing its size; the relaunch warns, falls back to step 1, trains step 2 again
    and ends with the same metrics as the first run (every step is a pure function of seed and step)."""
    run_dir = tmp_path / "run"
    steps = ["train.steps=2", "train.save_every=1", "train.keep_last=2"]
    first = subprocess.run([sys.executable, "-m", "launch.train", f"run_dir={run_dir}", *SMALL, *steps], cwd=ROOT,
                           env=job_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    _flip_a_byte(run_dir / "checkpoints" / "step_000002" / "policy.safetensors", at=-100)
    # summary.json stays: a finished run is verified too before "already complete" could be said.
    again = subprocess.run([sys.executable, "-m", "launch.train", f"run_dir={run_dir}", *SMALL, *steps], cwd=ROOT,
                           env=job_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "WARNING: checkpoint step_000002:" in again.stdout and "checksum" in again.stdout
    assert "resuming" in again.stdout and "from step_000001" in again.stdout
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "throughput/"))}
                           for x in lines]
    assert strip((run_dir / "metrics.jsonl").read_text().splitlines()) == strip(rows)
    assert (run_dir / "checkpoints" / "step_000002.corrupt").is_dir()
