"""Packed sweeps (src/train.py's train_pack, src/engines.py, hydra/launcher=packed): a packed member is its solo run,
exactly (loop engine, bitwise) or up to summation order (vmap engine, 1e-5), and keeps the solo run-dir contract."""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from src.checkpoint import load_checkpoint, save_checkpoint
from src.config import ConfigError
from src.lifecycle import Interrupted
from src.likelihoods import Bernoulli, build_likelihood
from src.engines import MemberStep, pad_latent, unpad_latent
from src.losses import elbo_terms
from src.models import ConvVAE, build_model
from src.rundir import RunDir, RunDirLock
from src.train import train, train_pack

from .conftest import compose_cfg, leet, metric_rows, run_cli, signal_when, tiny_overrides

# members that differ in every packable way the tests can tell apart: beta, latent_dim, lr, seed, KL schedule,
# free bits, weight decay
MEMBERS = [["loss.beta=1", "model.latent_dim=2", "seed=0"],
           ["loss.beta=4", "model.latent_dim=8", "optimizer.lr=0.003", "seed=1", "optimizer.weight_decay=0.001"],
           ["loss.beta=0.5", "model.latent_dim=4", "loss.kl_schedule=linear", "loss.warmup_steps=5",
            "loss.free_bits=0.05", "seed=2"]]


def packed_and_solo(root: Path, tiny, members, engine: str, extra=()):
    cfgs = [compose_cfg(tiny + list(extra) + m) for m in members]
    summaries = train_pack(cfgs, [root / f"p{i}" for i in range(len(cfgs))], engine=engine)
    for i, cfg in enumerate(cfgs):
        train(cfg, root / f"s{i}")
    return summaries


def results(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.startswith("perf/")}


def test_loop_engine_pack_is_bitwise_its_solo_runs(tmp_path, tiny):
    summaries = packed_and_solo(tmp_path, tiny, MEMBERS, "loop")
    for i in range(len(MEMBERS)):
        p, s = tmp_path / f"p{i}", tmp_path / f"s{i}"
        assert metric_rows(p) == metric_rows(s)  # every step's terms, kl_per_dim, every eval, bitwise
        solo = json.loads((s / "summary.json").read_text())
        assert results(summaries[i]) == results(solo)
        assert summaries[i]["perf/pack_members"] == 3 and summaries[i]["perf/pack_engine"] == "loop"
        a, b = load_checkpoint(p / "checkpoints/last.pt"), load_checkpoint(s / "checkpoints/last.pt")
        for key in b["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key
        for k, st in b["optimizer"]["state"].items():
            for name, value in st.items():
                assert torch.equal(a["optimizer"]["state"][k][name], value), (k, name)
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])  # a member resumes solo on its own noise
        assert a["step"] == b["step"] and a["data"]["generator"].equal(b["data"]["generator"])
        # the solo contract, file for file (train.log: Hydra's job log of a solo run, the pack's own per member)
        assert {x.name for x in p.iterdir()} == {x.name for x in s.iterdir()} | {"train.log"}


def bn_output(model, x):
    """A member's train-mode forward on a fixed batch at the posterior mean: what its BN-preceding biases and
    running means cannot change in exact arithmetic, so they are compared by it."""
    model.train()
    with torch.no_grad():
        mu, logvar = model.encode(x)
        return model.decode(mu), mu, logvar


def wanders(key: str) -> bool:
    """A conv bias in front of BatchNorm (encoder.0.0.bias, decoder.2.0.bias), or a BN running mean."""
    return key.endswith("running_mean") or (key.endswith(".0.bias") and "." in key[:-len(".0.bias")])


def model_of(cfg, state):
    model = build_model(cfg.model, cfg.data, build_likelihood(cfg.loss.likelihood, cfg.loss.sigma))
    model.load_state_dict(state["model"])
    return model


CASES = {  # members for the vmap engine: conv with every packable difference; MLP; Gaussian sigmas and capacity;
    # a learned sigma (a stacked parameter)
    "conv": MEMBERS,
    "conv_channels_last": MEMBERS,
    "mlp": [["model=mlp", "model.hidden_channels=[32]", "model.latent_dim=2", "seed=0"],
            ["model=mlp", "model.hidden_channels=[32]", "model.latent_dim=5", "optimizer.lr=0.003", "seed=1"]],
    "gaussian": [["loss.likelihood=gaussian", "loss.sigma=0.1", "loss.beta=2"],
                 ["loss.likelihood=gaussian", "loss.sigma=0.3", "loss.kl_schedule=capacity", "loss.capacity_max=5",
                  "loss.capacity_steps=4", "seed=1"]],
    "learned_sigma_adamw": [["loss.likelihood=gaussian_learned", "loss.sigma=0.1", "optimizer=adamw"],
                            ["loss.likelihood=gaussian_learned", "loss.sigma=0.2", "seed=1", "optimizer=adamw",
                             "optimizer.weight_decay=0.05"]],
}


@pytest.mark.parametrize("case", list(CASES))
def test_vmap_engine_pack_equals_its_solo_runs_within_1e_5(tmp_path, tiny, case):
    members = CASES[case]
    # a conv run in NHWC (channels_last) differs from one in NCHW by its kernels' summation order, which Adam
    # amplifies as much as any packing could; the vmap engine lays its grouped convs out as the members' runs do,
    # so compare like with like, in each layout
    extra = ["trainer.max_steps=3", "trainer.log_every=1", "trainer.eval_every=3",
             f"trainer.channels_last={case.endswith('channels_last')}"]
    packed_and_solo(tmp_path, tiny, members, "vmap", extra)
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    for i, m in enumerate(members):
        p, s = tmp_path / f"p{i}", tmp_path / f"s{i}"
        rows_p, rows_s = metric_rows(p), metric_rows(s)
        assert [r["step"] for r in rows_p] == [r["step"] for r in rows_s]
        for rp, rs in zip(rows_p, rows_s):
            for key in ("train/loss", "train/recon_nll", "train/kl", "train/neg_elbo", "train/kl_penalised",
                        "train/sigma"):
                if key in rs:
                    assert rp[key] == pytest.approx(rs[key], rel=1e-5, abs=1e-5), (rs["step"], key)
            if "train/kl_per_dim" in rs:
                assert rp["train/kl_per_dim"] == pytest.approx(rs["train/kl_per_dim"], rel=1e-5, abs=1e-5)
        a, b = load_checkpoint(p / "checkpoints/last.pt"), load_checkpoint(s / "checkpoints/last.pt")
        cfg = compose_cfg(tiny + extra + m)
        for key, value in b["model"].items():
            # conv biases in front of BatchNorm have a true gradient of zero (Adam turns rounding into steps) and
            # BN running means follow them: compared below by what they do
            if not wanders(key):
                torch.testing.assert_close(a["model"][key], value, rtol=1e-5, atol=1e-5, msg=key)
        names = [n for n, _ in model_of(cfg, b).named_parameters()]
        for k, st in b["optimizer"]["state"].items():
            if not wanders(names[k]):
                for moment in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(a["optimizer"]["state"][k][moment], st[moment], rtol=1e-5, atol=1e-5)
            assert float(a["optimizer"]["state"][k]["step"]) == float(st["step"]) == 3
        for out_p, out_s in zip(bn_output(model_of(cfg, a), x), bn_output(model_of(cfg, b), x)):
            torch.testing.assert_close(out_p, out_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_vmap_engines_grouped_convs_run_in_the_members_layout(tmp_path, tiny, monkeypatch, channels_last):
    """vmap turns the members' convs into grouped convs of (B, M * C, H, W); under trainer.channels_last each of
    them runs NHWC, as a member's own conv does (oneDNN's grouped kernels are several times slower in NCHW on a
    CPU), and NCHW where the members run NCHW. Seen on the physical tensor under vmap's wrapper."""
    from torch._C._functorch import get_unwrapped, is_batchedtensor, maybe_get_bdim

    from src import engines

    seen = []

    def record(module, inputs, out):
        while is_batchedtensor(out):  # (B, M, C, H, W) with the members' dim somewhere: as the grouped conv made it
            bdim, out = maybe_get_bdim(out), get_unwrapped(out)
            grouped = out.movedim(bdim, 1).flatten(1, 2)  # a view where the kernel's output was (B, M * C, H, W)
            seen.append(grouped.is_contiguous(memory_format=torch.channels_last))

    built = engines.VmapEngine.__init__

    def init(self, members):
        built(self, members)
        for module in self.step_fn.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                module.register_forward_hook(record)

    monkeypatch.setattr(engines.VmapEngine, "__init__", init)
    cfgs = [compose_cfg([*tiny, "trainer.max_steps=1", "eval.final=none", f"trainer.channels_last={channels_last}",
                         f"seed={i}"]) for i in range(2)]
    train_pack(cfgs, [tmp_path / f"p{i}" for i in range(2)], engine="vmap")
    assert seen == [channels_last] * 5  # the tiny conv's 3 convs and 2 transposed, each in the members' layout


def test_a_vmap_pack_resumed_from_its_checkpoints_equals_the_pack_never_stopped(tmp_path, tiny):
    """The vmap engine restacks parameters, BatchNorm buffers and Adam moments (and the step count) from the
    members' solo-format checkpoints: a pack continued with a larger budget trains on exactly as if never stopped."""
    cfgs = {steps: [compose_cfg(tiny + [f"trainer.max_steps={steps}", "trainer.eval_every=3"] + m) for m in MEMBERS]
            for steps in (3, 6)}
    train_pack(cfgs[6], [tmp_path / f"whole{i}" for i in range(3)], engine="vmap")
    train_pack(cfgs[3], [tmp_path / f"cont{i}" for i in range(3)], engine="vmap")
    summaries = train_pack(cfgs[6], [tmp_path / f"cont{i}" for i in range(3)], engine="vmap")
    assert [s["status"] for s in summaries] == ["finished"] * 3
    for i in range(3):
        a, b = (load_checkpoint(tmp_path / f"{kind}{i}/checkpoints/last.pt") for kind in ("cont", "whole"))
        assert a["step"] == b["step"] == 6
        for key in b["model"]:
            torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-6, atol=1e-7, msg=key)
        for k, st in b["optimizer"]["state"].items():
            for moment in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(a["optimizer"]["state"][k][moment], st[moment], rtol=1e-6, atol=1e-7)
        last = [next(r for r in metric_rows(tmp_path / f"{kind}{i}") if r["step"] == 6 and "train/loss" in r)
                for kind in ("cont", "whole")]  # both the mean of steps 5 and 6
        assert last[0]["train/loss"] == pytest.approx(last[1]["train/loss"], rel=1e-6)


def test_members_that_differ_in_a_key_that_does_not_pack_are_refused_with_its_name(tmp_path, tiny):
    cfgs = [compose_cfg(tiny + m) for m in (["model.hidden_channels=[8,16]"], ["model.hidden_channels=[4,8]"])]
    with pytest.raises(ConfigError, match="model.hidden_channels differs between the members of a pack"):
        train_pack(cfgs, [tmp_path / "a", tmp_path / "b"], engine="vmap")
    for member in ("a", "b"):  # each member's own record says why, and nothing was trained
        summary = json.loads((tmp_path / member / "summary.json").read_text())
        assert summary["status"] == "failed" and "model.hidden_channels" in summary["error"]
        assert not (tmp_path / member / "checkpoints").exists()


@pytest.mark.parametrize("free_bits", [0.0, 0.5])
def test_a_padded_member_is_exactly_the_small_model(free_bits):
    """latent 2 padded to 8: its dead dims carry zero KL and get zero gradient, and its loss is the small model's."""
    torch.manual_seed(0)
    small = ConvVAE(1, 16, [8, 16], 2, Bernoulli())
    big = ConvVAE(1, 16, [8, 16], 8, Bernoulli())
    layout = big.latent_layout()
    padded = {n: pad_latent(layout.get(n), p.detach(), 2, 8).requires_grad_() for n, p in small.named_parameters()}
    buffers = {n: b.clone() for n, b in small.named_buffers()}
    x = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    in_use = torch.arange(8) < 2
    terms = torch.func.functional_call(
        MemberStep(big), ({f"model.{n}": p for n, p in padded.items()}, {f"model.{n}": b for n, b in buffers.items()}),
        (x, torch.nn.functional.pad(eps, (0, 6)), in_use, torch.tensor(4.0), torch.tensor(False), torch.tensor(0.0),
         torch.tensor(free_bits)))
    params, mu, logvar = small(x, eps)
    expected = elbo_terms(small.likelihood.nll(params, x), mu, logvar, torch.tensor(4.0), torch.tensor(False),
                          torch.tensor(0.0), torch.tensor(free_bits))
    assert torch.all(terms["kl_per_dim"][2:] == 0)
    torch.testing.assert_close(terms["kl_per_dim"][:2], expected["kl_per_dim"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(terms["loss"], expected["loss"], rtol=1e-6, atol=1e-5)
    grads = dict(zip(padded, torch.autograd.grad(terms["loss"], list(padded.values()))))
    head = f"encoder.{len(big.encoder) - 1}.weight"
    assert torch.all(grads[head][2:8] == 0) and torch.all(grads[head][10:] == 0)  # dead mu and logvar rows
    assert torch.all(grads["decoder.0.weight"][:, 2:] == 0)  # dead decoder columns
    expected["loss"].backward()
    for n, p in small.named_parameters():
        torch.testing.assert_close(unpad_latent(layout.get(n), grads[n], 2, 8), p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_sigterm_a_pack_then_resume_one_member_solo_and_the_rest_as_a_pack(tmp_path, tiny):
    extra = ["trainer.max_steps=40", "trainer.eval_every=8", "trainer.checkpoint_every=2", "trainer.log_every=4",
             "optimizer.scheduler=exponential", "optimizer.gamma=0.9"]  # epochs of 8 steps: the LR moves at each
    cfgs = [compose_cfg(tiny + extra + m) for m in MEMBERS]
    dirs = [tmp_path / f"p{i}" for i in range(3)]

    def stop_when_checkpointed():
        while not (dirs[0] / "checkpoints/last.pt").is_file():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_checkpointed, daemon=True).start()
    with pytest.raises(Interrupted):
        train_pack(cfgs, dirs, engine="loop")
    stopped = [json.loads((d / "summary.json").read_text()) for d in dirs]
    assert {s["status"] for s in stopped} == {"interrupted"} and len({s["step"] for s in stopped}) == 1
    assert 0 < stopped[0]["step"] < 40
    assert all(load_checkpoint(d / "checkpoints/last.pt")["step"] == stopped[0]["step"] for d in dirs)
    assert train(cfgs[0], dirs[0])["status"] == "finished"  # one member alone, from the pack's checkpoint
    assert [s["status"] for s in train_pack(cfgs[1:], dirs[1:], engine="loop")] == ["finished"] * 2
    for i, cfg in enumerate(cfgs):
        train(cfg, tmp_path / f"s{i}")
        assert metric_rows(dirs[i]) == metric_rows(tmp_path / f"s{i}")  # as if never stopped, bitwise
        a, b = (load_checkpoint(d / "checkpoints/last.pt")["model"] for d in (dirs[i], tmp_path / f"s{i}"))
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_signal_between_two_members_turns_checkpoints_every_member_at_the_same_step(tmp_path, tiny):
    """The pack reads a signal once per step: one that arrives while the second member logs step 6 (the first has
    had its turn) is acted on at the next step by every member, so none stops without its checkpoint."""
    cfgs = [compose_cfg(tiny + ["trainer.max_steps=40", "trainer.max_epochs=null", "trainer.eval_every=20",
                         "trainer.log_every=2"] + m)
            for m in MEMBERS[:2]]
    dirs = [tmp_path / "a", tmp_path / "b"]
    with signal_when("logged", dirs[1], step=6), pytest.raises(Interrupted):
        train_pack(cfgs, dirs, engine="loop")
    assert [json.loads((d / "summary.json").read_text())["step"] for d in dirs] == [7, 7]
    assert [load_checkpoint(d / "checkpoints/last.pt")["step"] for d in dirs] == [7, 7]


def test_members_at_different_steps_train_in_groups_and_each_equals_its_solo_run(tmp_path, tiny):
    """A pack stopped between two members' checkpoint writes (kill -9, a node failure) is run again as it was when
    SLURM requeues its job: the members resume from their own steps, a group per step, one after another. It used to
    refuse ("must resume from the same step"). A stop while one group trains leaves a waiting member at its step."""
    cfgs = [compose_cfg(tiny + ["trainer.max_steps=16", "trainer.max_epochs=null", "trainer.eval_every=8",
                                "trainer.log_every=2"] + m) for m in MEMBERS]
    dirs = [tmp_path / f"p{i}" for i in range(3)]
    with signal_when("logged", dirs[1], step=4), pytest.raises(Interrupted):  # member 1 alone stops at step 5
        train(cfgs[1], dirs[1])
    assert load_checkpoint(dirs[1] / "checkpoints/last.pt")["step"] == 5

    with signal_when("logged", dirs[2], step=10), pytest.raises(Interrupted):  # members 0 and 2 first, from step 0
        train_pack(cfgs, dirs, engine="loop")
    steps = [json.loads((d / "summary.json").read_text())["step"] for d in dirs]
    assert steps == [11, 5, 11]  # member 1 waited for its turn: still at its own step, and says so
    assert [load_checkpoint(d / "checkpoints/last.pt")["step"] for d in dirs] == steps

    summaries = train_pack(cfgs, dirs, engine="loop")
    assert [s["status"] for s in summaries] == ["finished"] * 3
    assert [s["perf/pack_members"] for s in summaries] == [2, 1, 2]
    for i, cfg in enumerate(cfgs):
        train(cfg, tmp_path / f"s{i}")
        assert metric_rows(dirs[i]) == metric_rows(tmp_path / f"s{i}")  # as if never stopped, bitwise
        a, b = (load_checkpoint(d / "checkpoints/last.pt")["model"] for d in (dirs[i], tmp_path / f"s{i}"))
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_signal_during_the_packs_final_evals_keeps_the_finished_and_a_rerun_finishes_the_rest(tmp_path, tiny):
    """After the loop each member's final eval runs in turn; a SIGTERM there (here as member 1 logs its end) stops
    the pack at once: member 0 stays finished, members 1 and 2 are interrupted at the last step, and the same pack
    again redoes only their final evals, each then equal to its solo run."""
    cfgs = [compose_cfg(tiny + ["trainer.max_steps=8", "trainer.log_every=2"] + m) for m in MEMBERS]
    dirs = [tmp_path / f"p{i}" for i in range(3)]
    with signal_when("finished", dirs[1]), pytest.raises(Interrupted):
        train_pack(cfgs, dirs, engine="loop")
    stopped = [json.loads((d / "summary.json").read_text()) for d in dirs]
    assert [(s["status"], s["step"]) for s in stopped] == [("finished", 8), ("interrupted", 8), ("interrupted", 8)]
    summaries = train_pack(cfgs, dirs, engine="loop")
    assert [s["status"] for s in summaries] == ["finished"] * 3
    for i, cfg in enumerate(cfgs):
        solo = train(cfg, tmp_path / f"s{i}")
        assert results(summaries[i]) == results(solo), i
        assert metric_rows(dirs[i]) == metric_rows(tmp_path / f"s{i}"), i  # the test row once


def test_a_member_whose_run_dir_is_in_use_is_refused_and_the_others_train(tmp_path, tiny):
    """Another process holds member 1's run dir (a solo run the user started there): member 1 is refused with the
    solo line and its dir left as it was; the other members train as a pack of two."""
    cfgs = [compose_cfg(tiny + m) for m in MEMBERS]
    dirs = [tmp_path / f"p{i}" for i in range(3)]
    dirs[1].mkdir()
    holder = RunDirLock(RunDir(dirs[1]))  # (flock: a second open file in this process is refused as another's)
    try:
        summaries = train_pack(cfgs, dirs, engine="loop")
    finally:
        holder.release()
    assert [s["status"] for s in summaries] == ["finished", "failed", "finished"]
    assert "is in use by pid" in summaries[1]["error"]
    assert [s["perf/pack_members"] for s in (summaries[0], summaries[2])] == [2, 2]
    assert {x.name for x in dirs[1].iterdir()} == {".lock", "train.log"}  # nothing of the pack's but its refusal
    [line] = (dirs[1] / "train.log").read_text().splitlines()  # (a refused solo run appends the same line)
    assert "Refused: run dir" in line and "is in use by pid" in line


def test_a_diverging_member_is_frozen_and_the_others_equal_their_solo_runs(tmp_path, tiny):
    extra = ["trainer.max_steps=6", "trainer.log_every=1", "trainer.eval_every=3"]
    members = [MEMBERS[0], ["optimizer.lr=1e3", "loss.beta=4", "seed=3"], MEMBERS[2]]
    cfgs = [compose_cfg(tiny + extra + m) for m in members]
    summaries = train_pack(cfgs, [tmp_path / f"p{i}" for i in range(3)], engine="vmap")
    assert summaries[1]["status"] == "diverged" and "non-finite" in summaries[1]["error"]
    assert [summaries[0]["status"], summaries[2]["status"]] == ["finished", "finished"]
    for i in (0, 2):
        train(cfgs[i], tmp_path / f"s{i}")
        for rp, rs in zip(metric_rows(tmp_path / f"p{i}"), metric_rows(tmp_path / f"s{i}"), strict=True):
            if "train/loss" in rs:
                assert rp["train/loss"] == pytest.approx(rs["train/loss"], rel=1e-5), rs["step"]


@pytest.mark.slow  # the packed launcher's real processes
def test_packed_launcher_packs_by_architecture_and_keeps_each_members_contract(tmp_path, cache_dir):
    """A 2 x 2 x 2 multirun where hidden_channels differs: two packs, every member a complete run with its own W&B
    run; a rerun skips them all."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=packed", *tiny_overrides(cache_dir), "model.hidden_channels=[8,16],[4,8]",
            "loss.beta=1,4", "seed=0,1", "logger=wandb", "logger.mode=offline", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(args)  # the driver in this process; each pack is its own process, as submitit starts it
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pack 0: members 0, 1, 2, 3" in proc.stdout and "pack 1: members 4, 5, 6, 7" in proc.stdout
    # the packs' own logs are told in the sweep's terminal: where they are, the engine, each member finished
    assert proc.stdout.count("its log is") == 2 and "pack of members 0-3 (job" in proc.stdout
    assert proc.stdout.count(": Finished: val/neg_elbo") == 8 and "engine" in proc.stdout.split("its log is")[-1]
    contract = {".hydra", "checkpoints", "metrics.jsonl", "summary.json", "train.log", "trained_with.yaml",
                "samples.png", "reconstructions.png", "traversals.png", "samples", "recons", "traversals", "wandb",
                "wandb_run_id"}
    for member in range(8):
        rd = sweep / str(member)
        assert contract <= {x.name for x in rd.iterdir()}, member
        summary = json.loads((rd / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["perf/pack_members"] == 4
        assert (rd / "checkpoints/last.pt").is_file() and (rd / "checkpoints/best.pt").is_file()
        assert "eval step 8" in (rd / "train.log").read_text()
        runs = list((rd / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, member  # its own W&B run, named by its swept keys as a solo member's is
        header = json.dumps(leet(runs[0]))
        beta, seed = (1, 4)[member // 2 % 2], member % 2
        assert f"beta={beta} seed={seed}" in header and str(sweep.name) in header
    again = run_cli(args)
    assert again.returncode == 0 and again.stdout.count("finished already; skipped") == 8


@pytest.mark.slow  # the packed launcher's real processes
def test_a_member_with_a_truncated_checkpoint_fails_naming_it_and_the_others_go_on(tmp_path, cache_dir):
    """Planning reads each member's resume step: a damaged last.pt sends that member the ordinary way, where its
    one line names the file (it was a traceback of the whole sweep); its finished result is kept, the sweep report
    names it, and the rest of the sweep continues."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=packed", *tiny_overrides(cache_dir), "loss.beta=1,4", f"hydra.sweep.dir={sweep}"]
    assert run_cli([*args, "trainer.max_steps=4"]).returncode == 0
    last = sweep / "0" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    proc = run_cli([*args, "trainer.max_steps=8"])
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert f"member 0 runs on its own: checkpoint {last} is damaged or truncated" in proc.stdout
    assert f"member 0 failed: Checkpoint error: checkpoint {last} is damaged or truncated" in proc.stdout
    kept = json.loads((sweep / "0" / "summary.json").read_text())
    assert (kept["status"], kept["step"]) == ("finished", 4)
    finished = json.loads((sweep / "1" / "summary.json").read_text())
    assert (finished["status"], finished["step"]) == ("finished", 8)


@pytest.mark.slow  # the packed launcher's real processes
def test_a_bad_member_is_refused_without_stopping_its_pack(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "hydra/launcher=packed", *tiny_overrides(cache_dir), "loss.beta=1,-1,4",
                    f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 1
    assert "member 1 runs on its own" in proc.stdout and "pack 0: members 0, 2" in proc.stdout
    assert "member 1 failed" in proc.stdout and "loss.beta" in proc.stdout
    for member in (0, 2):
        assert json.loads((sweep / str(member) / "summary.json").read_text())["status"] == "finished"
    assert "loss.beta" in json.loads((sweep / "1" / "summary.json").read_text())["error"]


@pytest.mark.parametrize("override, line", [
    ("hydra.launcher.engine=fast", "hydra.launcher.engine='fast' is not allowed; choose one of auto, loop, vmap"),
    ("hydra.launcher.max_members=0", "hydra.launcher.max_members=0 and min_members=2 must be >= 1"),
    ("hydra.launcher.min_members=17", "hydra.launcher.min_members=17 is more than max_members=16; no pack could form: "
                                     "lower min_members or raise max_members"),
])
def test_a_bad_launcher_knob_is_one_line_naming_it(tmp_path, tiny, override, line):
    proc = run_cli(["-m", "hydra/launcher=packed", override, *tiny, "loss.beta=1,2", f"hydra.sweep.dir={tmp_path}"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"Config error: {line}"], proc.stderr
    assert not any(tmp_path.iterdir())  # nothing ran


@pytest.mark.slow  # six runs of 100 steps with evals
def test_a_vmap_member_is_its_solo_run_to_the_floating_point_floor_whoever_shares_its_pack(tmp_path, tiny):
    """100 steps, evals at 50 and 100. The solo run's two memory layouts (NHWC, NCHW) agree on -ELBO within 5e-4; a
    vmap member (beta 4, packed with beta 1; its grouped convs in the solo run's NHWC) equals its solo run in every
    ELBO term and MI within 1e-5 relative (measured: 2.2e-7 and 1.3e-6; the layouts differ by 1e-3 in KL); packed with
    beta 16 instead, every val/test number within 1e-5; and the default engine, run twice, is the same engine with
    bitwise the same numbers."""
    base = [*tiny, "trainer.max_steps=100", "trainer.eval_every=50", "trainer.log_every=10"]
    cfg = lambda *extra: compose_cfg([*base, *extra])  # noqa: E731
    solo = train(cfg("loss.beta=4"), tmp_path / "solo")
    nchw = train(cfg("loss.beta=4", "trainer.channels_last=false"), tmp_path / "nchw")
    with_1 = train_pack([cfg("loss.beta=1"), cfg("loss.beta=4")], [tmp_path / "a1", tmp_path / "a4"], "vmap")[1]
    with_16 = train_pack([cfg("loss.beta=16"), cfg("loss.beta=4")], [tmp_path / "b16", tmp_path / "b4"], "vmap")[1]
    rel = lambda a, b: abs(a - b) / abs(b)  # noqa: E731
    for key in ("val/neg_elbo", "test/neg_elbo"):
        assert rel(nchw[key], solo[key]) < 5e-4, key
    for split in ("val", "test"):
        for term in ("neg_elbo", "recon_nll", "kl", "iwae_nll", "mutual_info"):
            key = f"{split}/{term}"
            assert rel(with_1[key], solo[key]) <= 1e-5, key
    for key, value in with_16.items():  # who shares the pack does not move a member's numbers
        if key.startswith(("val/", "test/")) and isinstance(value, float):
            assert value == pytest.approx(with_1[key], rel=1e-5, abs=1e-7), key
    runs = [train_pack([cfg("loss.beta=1"), cfg("loss.beta=4")], [tmp_path / f"c{i}a", tmp_path / f"c{i}b"])
            for i in range(2)]
    assert runs[0][1]["perf/pack_engine"] == runs[1][1]["perf/pack_engine"] == "vmap"  # 0.2 MFLOP a member on a CPU
    for a, b in zip(*runs):
        assert results(a) == results(b)  # bitwise
    for i in range(2):
        assert metric_rows(tmp_path / f"c0{'ab'[i]}") == metric_rows(tmp_path / f"c1{'ab'[i]}")


def test_auto_is_a_rule_recorded_with_each_member_and_kept_when_the_pack_resumes(tmp_path, tiny):
    """On a CPU, auto takes vmap for a tiny model and loop for a larger one, by its FLOPs, never by a timing race;
    the engine is in each member's summary and checkpoint, and a pack resumed from those checkpoints keeps it."""
    tiny_members = [compose_cfg([*tiny, "trainer.max_steps=2", f"seed={i}"]) for i in range(2)]
    summaries = train_pack(tiny_members, [tmp_path / "t0", tmp_path / "t1"])
    assert [s["perf/pack_engine"] for s in summaries] == ["vmap", "vmap"]
    assert load_checkpoint(tmp_path / "t0" / "checkpoints" / "last.pt")["engine"] == "vmap"
    larger = [*tiny, "model.hidden_channels=[16,32]", "data.image_size=32", "trainer.max_steps=2"]
    summaries = train_pack([compose_cfg([*larger, f"seed={i}"]) for i in range(2)], [tmp_path / "l0", tmp_path / "l1"])
    assert [s["perf/pack_engine"] for s in summaries] == ["loop", "loop"]  # 2.8 MFLOP a member: loop
    # a pack stopped and resumed keeps the engine it trained with, whatever auto would say now
    for i in range(2):
        path = tmp_path / f"t{i}" / "checkpoints" / "last.pt"
        save_checkpoint({**load_checkpoint(path), "engine": "loop"}, path)
    longer = [compose_cfg([*tiny, "trainer.max_steps=4", f"seed={i}"]) for i in range(2)]
    assert [s["perf/pack_engine"] for s in train_pack(longer, [tmp_path / "t0", tmp_path / "t1"])] == ["loop"] * 2


def test_a_vmap_packs_batched_eval_is_each_members_own_eval(tmp_path, tiny, monkeypatch):
    """The vmap engine evaluates its members in one vmapped pass over each batch (latents 2 and 4 padded to 8 and
    masked; on a GPU, and here because VMAP_EVALS_ON says so); each member's own eval of the same weights (its
    checkpoint, one model at a time, as src.evaluate does) gives the same numbers within 1e-5, MIG included."""
    from src import engines
    from src.config_check import parse
    from src.data import load_data, mean_image
    from src.losses import Objective
    from src.metrics import Evaluee, evaluate_split

    monkeypatch.setattr(engines, "VMAP_EVALS_ON", {"cpu", "cuda"})
    passes = []
    monkeypatch.setattr(engines.VmapEngine, "eval_member",
                        lambda self, *a, _f=engines.VmapEngine.eval_member, **k: passes.append(1) or _f(self, *a, **k))
    cfgs = [compose_cfg(tiny + ["trainer.max_steps=6", "trainer.eval_every=6"] + m) for m in MEMBERS]
    summaries = train_pack(cfgs, [tmp_path / f"p{i}" for i in range(3)], engine="vmap")
    assert {s["perf/pack_engine"] for s in summaries} == {"vmap"} and passes  # the vmapped pass ran
    for i, raw in enumerate(cfgs):
        cfg = parse(raw)
        data = load_data(cfg.data)
        state = load_checkpoint(tmp_path / f"p{i}" / "checkpoints" / "last.pt")
        model = model_of(raw, state)
        objective = Objective(cfg.loss, 6, likelihood=model.likelihood)
        for split, k in (("val", cfg.eval.iwae_k), ("test", cfg.eval.iwae_k_test)):
            [own] = evaluate_split([Evaluee(model, objective, cfg)], data, split, device=torch.device("cpu"), step=6,
                                   iwae_k=k, mean_img=mean_image(data.images["train"]))
            for key, value in own.items():
                if isinstance(value, float):
                    assert summaries[i][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (i, key)
                elif isinstance(value, list):
                    assert summaries[i][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (i, key)
                else:
                    assert summaries[i][key] == value, (i, key)


def test_a_jobs_log_is_relayed_its_news_at_once_and_its_progress_at_most_every_30_s(tmp_path, caplog):
    """What a watcher of a packed or submitit sweep sees in the terminal: warnings and finished members as they
    come, the step counter throttled, a torn last line kept until it is whole."""
    from hydra_plugins.vae_sweeps.launchers import Relay

    path = tmp_path / "job_0_log.err"
    relay = Relay("pack of members 0-3 (job 7)", path)
    relay()  # not written yet: nothing, no error
    path.write_text("[t][src.loop][INFO] - step 2/8 | loss 1.0\n[t][src.loop][WARNING] - member 2 diverged\n"
                    "[t][src.loop][INFO] - step 4/8 | loss 0.9\n[t][src.loop][INFO] - Finished: val/neg_elbo 1")
    with caplog.at_level(logging.INFO, logger="hydra_plugins"):
        relay()
        told = [r.getMessage() for r in caplog.records]
        assert told == ["pack of members 0-3 (job 7): member 2 diverged"]  # progress waits; the torn line too
        relay(final=True)
    told = [r.getMessage() for r in caplog.records]
    assert told[1:] == ["pack of members 0-3 (job 7): Finished: val/neg_elbo 1",
                        told[2]] and told[2].startswith("pack of members 0-3 (job 7): step 4/8 (50%")
