"""The training loop, written once for any number of members: a solo run is a loop of one member; a packed sweep's
members share one loop, and an engine (src/engines.py) takes the step of all of them.

fit() reads: the engine -> each step: every live member's batch, one engine step, the terms of all members added
at once -> each member's state advanced -> the signal read once -> what is due (log, eval, checkpoint), for each
member, only at the steps where something is -> a stop, once every member has its checkpoint -> after the last
step, each member's final test eval. The loop owns two policies:
- divergence: a member whose terms go non-finite is ended `diverged` at the check its solo run would make and frozen;
  the others go on (a solo run has no others, so it stops).
- signals: a stop request is read once per step, before any member's checkpoint turn, so every member checkpoints at
  the same step, then the loop raises it (Interrupted, or Requeued in a SLURM job: src/lifecycle.py).
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional

import torch
from tqdm import tqdm

from .checkpoint import save_checkpoint
from .config import Config
from .device import synchronize
from .engines import choose_engine
from .fid import evaluate_fid
from .identity import refuse_unpackable
from .judge import sample_quality
from .metrics import Evaluee, evaluate_split
from .lifecycle import DivergedError, StopSignals
from .state import LoopSums
from .loggers import MemberLogs
from .member import Member
from .prior import mixture_quality

log = logging.getLogger(__name__)

WARMUP_STEPS = 5  # steps left out of perf/train_images_per_s (allocator, cudnn autotune, compilation)

# Who watches the loop: each is called as watcher(event, member, step) right after the loop has "logged" a member's
# train row, "evaluated" it, "checkpointed" it (last.pt written) or "finished" its final eval. A script or a test
# lands a signal or a kill at an exact point through it.
WATCHERS: List[Callable[[str, Member, int], None]] = []


def _tell(event: str, m: Member, step: int) -> None:
    for watcher in WATCHERS:
        watcher(event, m, step)


class Throughput:
    """Training images per second over training steps only: from `warmup` steps into this process, with the
    clock stopped while evaluating."""

    def __init__(self, device: torch.device, warmup: int = WARMUP_STEPS):
        self.device, self.warmup = device, warmup
        self.seconds, self.images, self.steps = 0.0, 0, 0
        self.started: Optional[float] = None
        self.pending = 0

    def before_step(self) -> None:
        if self.started is None and self.steps >= self.warmup:
            synchronize(self.device)
            self.started, self.pending = time.perf_counter(), 0

    def after_step(self, images: int) -> None:
        self.steps += 1
        self.pending += images

    def pause(self) -> None:
        if self.started is not None:
            synchronize(self.device)
            self.seconds += time.perf_counter() - self.started
            self.images += self.pending
            self.started = None

    def images_per_s(self) -> Optional[float]:
        return self.images / self.seconds if self.seconds > 0 else None


# ---------------------------------------------------------------------------------------------- the loop


def fit(members: List[Member], engine_name: str, stop: StopSignals, end: Callable[[Member, Optional[BaseException]], None],
        logs: Optional[MemberLogs] = None) -> None:
    """Train `members` (all at one step) to the end of their budget, then give each its final test eval.

    `end(member, error)` closes a member's run: once it finished (error None), or when it diverged. A signal is
    raised here after every member's checkpoint is written; the caller ends the members still open. `logs` routes
    each member's lines to its own train.log (a pack's)."""
    first = members[0]
    total, place = first.objective.total_steps, first.place
    refuse_unpackable([m.state.config for m in members])
    engine = choose_engine(engine_name, members)
    for m in members:  # recorded in each member's checkpoints and summary
        m.state.engine = engine.name
    def on(m: Member):
        return logs.member(m.run.dir.root) if logs is not None else nullcontext()

    what = f"a pack of {len(members)} members ({', '.join(m.run.dir.root.name for m in members)}) with engine " \
        f"{engine.name}" if len(members) > 1 else "one run"
    log.info("Training %s from step %d of %d: precision %s, compile %s, channels_last %s", what, first.state.step,
             total, engine.precision, engine.compile_mode, first.state.batches.memory_format == torch.channels_last)
    meter = Throughput(place.device)
    cadence = Cadence(first.cfg, len(first.state.batches), total)
    sums = LoopSums([m.state.sums for m in members])  # from here each member's sums are a row of these
    streams = [m.state.batches_from_here() for m in members]
    live = [True] * len(members)
    for m in members:
        m.state.model.train()
    stop.defer, stop.step = True, first.state.step  # from here a signal ends the loop at the next step boundary,
    # after every member's checkpoint; outside the loop (the final evals) it stops at once, at the step reached
    show = first.cfg.trainer.progress and place.rank == 0
    bar = tqdm(total=total, initial=first.state.step, disable=not show, unit="step", dynamic_ncols=True,
               desc="train" if len(members) == 1 else f"pack of {len(members)}")
    step = first.state.step
    started, val_s = time.perf_counter(), [0.0] * len(members)  # the phases' wall time (summary perf/*_s)
    while step < total and any(live):
        # 1. one step of every live member, its terms added for all members at once
        xs = [next(s) if ok else None for s, ok in zip(streams, live)]
        meter.before_step()
        terms = engine.step(xs, step)
        meter.after_step(place.world_size * sum(len(x) for x in xs if x is not None))
        step += 1
        stop.step = step
        sums.add(terms, step)
        bar.update()
        # 2. each member's state moves on (its epoch and LR schedule with it); what is due at this step, for each
        # member, then a stop a signal asked for (read once: a signal that arrives during a member's turn is acted
        # on at the next step, by every member, never without a checkpoint). Nothing due: no member is touched.
        stopping = stop.received
        due = cadence.any(step) or stopping
        lrs = [m.state.optimizer.param_groups[0]["lr"] for m in members] if due else []  # the rates this step used
        for k, m in enumerate(members):
            if live[k]:
                m.state.advance()
        vals: List[Optional[Dict[str, Any]]] = [None] * len(members)
        if cadence.eval(step) and place.rank == 0:  # every live member's val eval in one pass over each batch
            meter.pause()
            clock = time.perf_counter()
            # (a member that went non-finite is not evaluated: its turn below ends it as diverged)
            ks = [k for k in range(len(members)) if live[k] and members[k].state.sums.divergence() is None]
            for k, val in zip(ks, evaluate_members([members[k] for k in ks], ks, engine, "val", step) if ks else []):
                vals[k] = val
            for k in ks:
                val_s[k] += (time.perf_counter() - clock) / len(ks)
        for k, m in enumerate(members):
            if not (due and live[k]):
                continue
            with on(m):
                try:
                    clock = time.perf_counter()
                    row = after_step(m, cadence, lrs[k], stopping, lambda k=k: engine.sync(k), vals[k])
                    val_s[k] += time.perf_counter() - clock if cadence.eval(step) else 0.0
                except DivergedError as e:  # this member stops as its solo run would; the others go on
                    live[k] = False
                    engine.freeze(k)
                    sums.freeze(k)
                    end(m, e)
                    continue
            if row is not None and len(members) == 1:
                bar.set_postfix(loss=f"{row['train/loss']:.1f}", kl=f"{row['train/kl']:.1f}")
        if stopping:
            stop.stop(step)
    bar.close()
    stop.defer = False
    if stop.received:  # it arrived during the last step's turns, after the loop read it: every checkpoint is written
        stop.stop(step)
    rate, loop_s = meter.images_per_s(), time.perf_counter() - started
    ks = [k for k in range(len(members)) if live[k]]  # 3. the final evals: the test split of all at once, then each
    clock = time.perf_counter()  # member's own (grids, judge); a member is ended finished as soon as it is done
    tests = evaluate_members([members[k] for k in ks], ks, engine, "test", step) \
        if ks and place.rank == 0 and first.cfg.eval.final == "test" else [{} for _ in ks]
    test_s = (time.perf_counter() - clock) / max(1, len(ks))
    for k, test in zip(ks, tests):
        m = members[k]
        if place.rank != 0:
            end(m, None)
            continue
        with on(m):
            try:
                clock = time.perf_counter() - test_s
                m.run.summary.update(finish(m, lambda k=k: engine.sync(k), test))
            except Exception as e:
                end(m, e)
                continue
            # wall seconds: the loop's (its steps and val evals, all members'), this member's val evals and final eval
            m.run.summary.update({"perf/loop_s": loop_s, "perf/val_eval_s": val_s[k],
                                  "perf/test_eval_s": time.perf_counter() - clock})
            if rate is not None:  # a member's share of the loop's rate, and the loop's
                m.run.summary.update({"perf/train_images_per_s": rate / len(members), "perf/pack_images_per_s": rate})
            m.run.summary.update({"perf/pack_members": len(members), "perf/pack_engine": engine.name,
                                  "perf/threads": torch.get_num_threads(), "compile": engine.compile_mode})
            log_finished(m.run.summary, m)
            _tell("finished", m, m.state.step)
        end(m, None)  # finished: a signal during another member's final eval does not touch it


# ---------------------------------------------------------------------------------------------- one member


class Cadence:
    """When a log, an eval and a checkpoint are due: the same for every member of a loop (trainer.* and the data,
    which decide them, split packs)."""

    def __init__(self, cfg: Config, steps_per_epoch: int, total: int):
        self.total, self.log_every = total, cfg.trainer.log_every
        self.eval_every = cfg.trainer.eval_every or steps_per_epoch
        self.checkpoint_every = cfg.trainer.checkpoint_every or self.eval_every

    def log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total

    def eval(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total

    def checkpoint(self, step: int) -> bool:
        return self.eval(step) or step % self.checkpoint_every == 0

    def any(self, step: int) -> bool:
        return self.log(step) or self.checkpoint(step)


def after_step(m: Member, cadence: Cadence, lr: float, stopping: bool, sync: Callable[[], None],
               val: Optional[Dict[str, Any]]) -> Optional[Dict]:
    """What is due for member m at its step: log the train/ means, record its val eval (`val`, which the loop ran
    for all its members at once) with the grids, and write the checkpoint, also when `stopping` (a signal asked to
    stop, as the loop read it for the step). `sync` brings m's own modules up to date before they are read (a
    packed member's live weights are the engine's). Raises DivergedError once a non-finite step is seen. Returns
    the train/ row it logged, if any."""
    cfg, state, rd, logger = m.cfg, m.state, m.run.dir, m.run.logger
    evaluating, logging_now = cadence.eval(state.step), cadence.log(state.step)
    checkpointing = cadence.checkpoint(state.step) or stopping
    if m.place.world_size > 1 and cadence.any(state.step):  # a collective: at the cadence's steps, which every rank
        state.sums.share_divergence()  # shares (a signal may reach one rank only)
    row = None
    if logging_now:
        if m.objective.likelihood.learned:  # its sigma is read there
            sync()
        row = _log_train(m, lr)
    if m.place.rank != 0:
        _raise_if_diverged(m)
        return row
    if evaluating:
        _raise_if_diverged(m)
        sync()
        improved = state.record_eval(val)
        logger.log(state.val, state.step)
        logger.log_images(m.grids.save(state.model, rd.root, state.step, state.val["val/kl_per_dim"]), state.step)
        _log_eval(m)
        _tell("evaluated", m, state.step)
    if checkpointing:
        _raise_if_diverged(m)  # never overwrite a good checkpoint with a diverged model
        sync()
        ckpt = state.state_dict()
        if evaluating and improved:  # best.pt first: a kill between the two writes redoes this eval on resume
            save_checkpoint(ckpt, rd.best)
        save_checkpoint(ckpt, rd.last)
        _tell("checkpointed", m, state.step)
    return row


def _raise_if_diverged(m: Member) -> None:
    """Stop with DivergedError, naming the step and terms, if any step so far went non-finite."""
    if (reason := m.state.sums.divergence()) is not None:
        last = m.run.dir.last
        kept = f"the last good checkpoint is kept in {last}" if last.is_file() else "no checkpoint was written"
        raise DivergedError(f"{reason}; {kept}")


def evaluate_members(members: List[Member], ks: List[int], engine, split: str, step: int) -> List[Dict[str, Any]]:
    """The eval of `split` for members (the engine's members `ks`) in one pass over each batch, by the engine (a
    vmapped pass for the vmap engine, each member's own model for the loop engine): each member's metrics."""
    first = members[0]
    for k in ks:  # (the blur measures read a member's own model)
        engine.sync(k)
    evaluees = [Evaluee(m.state.model, m.objective, m.cfg) for m in members]
    iwae_k = first.cfg.eval.iwae_k if split == "val" else first.cfg.eval.iwae_k_test
    return evaluate_split(evaluees, first.shared.data, split, device=first.place.device, step=step, iwae_k=iwae_k,
                          mean_img=first.shared.mean_img, precision=engine.precision, mapper=engine.eval_map(ks))


def finish(m: Member, sync: Callable[[], None], test: Dict[str, Any]) -> Dict[str, Any]:
    """The final test eval (after the last checkpoint: a kill here redoes only this block; eval.final=none leaves
    it to `python -m src.evaluate` for the members a sweep keeps): `test`, the split's metrics the loop ran for all
    its members, then FID and the judge where asked, and the final grids; returns the final metrics."""
    cfg, state, rd, logger = m.cfg, m.state, m.run.dir, m.run.logger
    sync()
    test = final_test_eval(m, test) if cfg.eval.final == "test" else {}
    if test:
        logger.log(test, state.step)
    logger.log_images(m.grids.save(state.model, rd.root, None, state.val["val/kl_per_dim"]), state.step,
                      prefix="test")  # the final grids, also W&B's test-time panels
    beta, capacity = m.objective.weights(state.step - 1)  # in force at the end, whatever the schedule reached
    return {"step": state.step, "epoch": state.epoch, **state.val, **test, "best/val_neg_elbo": state.best,
            "train/beta": beta, **({"train/capacity": capacity} if capacity is not None else {}),
            "grid/traversal_dims": m.grids.dims}  # traversals.png's rows, so a montage labels them right


def final_test_eval(m: Member, test: Dict[str, Any]) -> Dict[str, Any]:
    """The test split's metrics, with FID where asked and the judge's sample quality where the data has classes."""
    cfg, model, device = m.cfg, m.state.model, m.place.device
    test = dict(test)
    if cfg.eval.fid:
        test.update(evaluate_fid(model, m.shared.data.images["test"], cfg, device, "test"))
    real = m.shared.judged(cfg, device) if cfg.eval.judge else None
    if real is not None:
        test.update(sample_quality(model, real, cfg.eval.fid_images, device))
    if cfg.eval.gmm_components > 0:  # the mixture prior, its grid, and its samples' scores where the judge can tell
        test.update(mixture_quality(model, m.shared.data.images["train"], real, cfg, device, m.run.dir.root,
                                    m.state.step))
    return test


def log_finished(s: Dict[str, Any], m: Member) -> None:
    log.info("Finished: val/neg_elbo %.2f nats/image (%.4f bits/dim), val/kl %.2f nats; outputs in %s",
             s["val/neg_elbo"], s["val/bits_per_dim"], s["val/kl"], m.run.dir.root)


def _log_train(m: Member, lr: float) -> Dict[str, Any]:
    """The train/ means since the last log, with what the schedules set for the step just taken (`lr` its rate)."""
    state, objective = m.state, m.objective
    _raise_if_diverged(m)  # the host syncs here, once per log interval
    beta, capacity = objective.weights(state.step - 1)
    row = {**state.sums.pop_means(), "train/beta": beta, "train/lr": lr, "epoch": state.epoch}
    if capacity is not None:
        row["train/capacity"] = capacity
    if objective.likelihood.learned:  # a learned sigma (sigma-VAE)
        row["train/sigma"] = objective.likelihood.scale()
    if m.run.logger:
        m.run.logger.log(row, state.step)
    log.info("step %d/%d | loss %.2f | recon_nll %.2f | kl %.2f nats/image | beta %.3g", state.step,
             objective.total_steps, row["train/loss"], row["train/recon_nll"], row["train/kl"], beta)
    _tell("logged", m, state.step)
    return row


def _log_eval(m: Member) -> None:
    v, cfg = m.state.val, m.cfg
    log.info("eval step %d | val/neg_elbo %.2f nats/image | val/iwae_nll %.2f (k=%d) | val/kl %.2f | dims with KL > "
             "%g nats %d/%d (active units %d) | val/mse %.5f (mean image %.5f) | sample blur %.3f (data %.3f)",
             m.state.step, v["val/neg_elbo"], v["val/iwae_nll"], cfg.eval.iwae_k, v["val/kl"], cfg.eval.collapse_nats,
             v["val/kl_active_units"], cfg.model.latent_dim, v["val/active_units"], v["val/mse"],
             v["val/mse_mean_image"], v["val/sample_blur"], v["val/data_blur"])
