"""Packed training: the members of a sweep that share an architecture train as one program, each still a complete
run of its own (run dir, lock, record, metrics, checkpoints in the solo format, W&B run, summary).

`train_pack(cfgs, run_dirs)` is a pack's `train()`. Every member is started by `src.train.start` exactly as a solo
run is (skipped when finished, refused with its one line, resumed from its checkpoint) and goes through the same
`after_step` (log, eval, checkpoint) and `finish` (final eval, grids) on its own unpacked model. Only the step is
shared, taken by one of two engines:

- `loop`: each member's own model and torch.optim optimizer, one after another: bitwise a solo run. The reference,
  and the fallback wherever grouped kernels lose (the 2-core CPU at the main job's size: docs/speed.md).
- `vmap`: the members' parameters stacked (M, ...) and one `torch.func.vmap` of the model over them (convolutions
  become grouped ones, linears batched matmuls, BatchNorm keeps per-member statistics), then one Adam/AdamW over
  the stacked tensors with per-member lr and weight decay, in torch.optim's order. A member with a smaller
  `model.latent_dim` is padded to the largest and masked: its extra dims have mu = logvar = 0 and zero noise, so
  they carry exactly zero KL, feed zero into the decoder and get zero gradient.

Why it is exact: every operation is block-diagonal over members. A member's values, gradient, Adam update,
BatchNorm statistics, data order (its own TrainBatches) and noise (its own generator, in the state its solo run's
generator would be in) depend only on its own slice; in floating point the vmap engine differs from a solo run only
by summation order.
"""
from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call, vmap
from tqdm import tqdm

from .checkpoint import rng_state
from .config import ConfigError
from .data import load_data, mean_image, resolve_on_device
from .device import autocast_for, resolve_compile, resolve_device, resolve_precision, synchronize
from .identity import flatten
from .lifecycle import USER_ERRORS, DivergedError, Interrupted, Requeued, RunLifecycle, StopSignals
from .losses import elbo_terms
from .models import build_model
from .optim import build_optimizer
from .rundir import RunDir, RunDirRefused, note_refused_member
from .train import Shared, Throughput, Trainee, TrainStep, after_step, finish, log_finished, start
from .config_check import parse

log = logging.getLogger(__name__)

# the keys whose values may differ inside a pack; any other difference (architecture, data, batch size,
# likelihood kind, precision, budget, ...) splits packs
PACKABLE = ("loss.beta", "loss.kl_schedule", "loss.warmup_steps", "loss.cycles", "loss.cycle_ratio",
            "loss.capacity_max", "loss.capacity_steps", "loss.free_bits", "loss.sigma", "optimizer.lr",
            "optimizer.weight_decay", "optimizer.gamma", "seed", "model.latent_dim")
ENGINES = ("auto", "loop", "vmap")
TERMS = ("loss", "recon_nll", "kl", "neg_elbo", "kl_penalised")


def _shared_keys(config: Dict[str, Any]) -> Dict[str, Any]:
    """The resolved config less the packable keys and the logger (each member keeps its own)."""
    return {k: v for k, v in flatten(config).items() if k not in PACKABLE and not k.startswith("logger.")}


def pack_signature(config: Dict[str, Any], resume_step: int) -> str:
    """What members must share to train as one pack: `_shared_keys`, and the step they resume from."""
    return repr(sorted(_shared_keys(config).items())) + f" step={resume_step}"


def refuse_unpackable(configs: Sequence[Dict[str, Any]]) -> None:
    """ConfigError naming the first key outside PACKABLE on which two members differ."""
    first = _shared_keys(configs[0])
    for config in configs[1:]:
        for key, value in _shared_keys(config).items():
            if first.get(key) != value:
                raise ConfigError(f"{key} differs between the members of a pack ({first.get(key)!r} and {value!r}); "
                                  f"only {', '.join(PACKABLE)} may (hydra/launcher=packed groups members by it)")


# ---------------------------------------------------------------------------------------------- a member's RNG


class MemberRNG:
    """A member's RNG states (what `checkpoint.rng_state()` holds: torch's CPU and CUDA generators, numpy's,
    Python's), kept apart from the process's. Its training noise comes from `noise`, a generator in the state its
    solo run's device generator would be in, so it draws the numbers the solo run's `randn_like` draws."""

    def __init__(self, state: Dict[str, Any], device: torch.device):
        self.device = device
        self.noise = torch.Generator(device)
        self.set(state)

    def _slot(self) -> Optional[int]:
        """Where the device's generator sits in the state: None for the CPU's, else its index among the GPUs."""
        return None if self.device.type == "cpu" else (self.device.index or 0)

    def set(self, state: Dict[str, Any]) -> None:
        self.state = state
        slot = self._slot()
        self.noise.set_state(state["torch"] if slot is None else state["cuda"][slot])

    def get(self) -> Dict[str, Any]:
        slot, state = self._slot(), dict(self.state)
        if slot is None:
            state["torch"] = self.noise.get_state()
        else:
            state["cuda"] = [s if i != slot else self.noise.get_state() for i, s in enumerate(state["cuda"])]
        return state

    def draw(self, batch: int, latent_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """(batch, latent_dim) standard normal noise, as the solo run's reparameterize draws it."""
        return torch.randn(batch, latent_dim, generator=self.noise, device=self.device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- engines


class LoopEngine:
    """Each member's dense step, one after another, through the solo run's own TrainStep."""

    name = "loop"

    def __init__(self, members: Sequence[Trainee]):
        t = members[0]
        precision = resolve_precision(t.cfg.trainer.precision, t.place.device)
        compile_mode = resolve_compile(t.cfg.trainer.compile, t.place.device, 1)
        self.steps = [TrainStep(m.state.model, m.objective, m.state.optimizer, m.state.scaler,
                                autocast_for(m.place.device, precision), compile_mode, 1) for m in members]

    def step(self, xs: List[Optional[torch.Tensor]], eps: List[Optional[torch.Tensor]],
             step: int) -> List[Optional[Dict[str, torch.Tensor]]]:
        return [None if x is None else take(x, step, e) for take, x, e in zip(self.steps, xs, eps)]

    def sync(self, i: int) -> None:
        """The members' own modules are the live ones."""

    def freeze(self, i: int) -> None:
        """A frozen member is no longer stepped (its batch is None)."""


def _latent_layer(model: nn.Module, name: str) -> Optional[str]:
    """Which latent-sized layer a parameter belongs to: "head" (the encoder's last Linear, (2 * latent, F), rows
    [mu | logvar]), "inlet" (the decoder's first Linear weight, (F, latent)), or None."""
    if name.startswith(f"encoder.{len(model.encoder) - 1}."):
        return "head"
    return "inlet" if name == "decoder.0.weight" else None


def pad_latent(model: nn.Module, name: str, t: torch.Tensor, d: int, d_max: int) -> torch.Tensor:
    """Parameter `name` of a latent-d member as it sits in a pack of latent d_max: mu rows to [0, d), logvar rows to
    [d_max, d_max + d), decoder columns to [0, d); zero elsewhere."""
    layer = _latent_layer(model, name)
    if d == d_max or layer is None:
        return t
    if layer == "head":
        out = t.new_zeros((2 * d_max, *t.shape[1:]))
        out[:d], out[d_max:d_max + d] = t[:d], t[d:]
        return out
    out = t.new_zeros((t.shape[0], d_max))
    out[:, :d] = t
    return out


def unpad_latent(model: nn.Module, name: str, t: torch.Tensor, d: int, d_max: int) -> torch.Tensor:
    """The inverse of pad_latent: the member's own tensor."""
    layer = _latent_layer(model, name)
    if d == d_max or layer is None:
        return t
    return torch.cat([t[:d], t[d_max:d_max + d]]) if layer == "head" else t[:, :d]


class _MemberStep(nn.Module):
    """One member's forward pass and ELBO terms, written for vmap: its settings come as tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, eps, in_use, beta, capacity_on, capacity, free_bits):
        mu, logvar = self.model.encode(x)  # (B, D_max) each
        mu, logvar = torch.where(in_use, mu, 0.0), torch.where(in_use, logvar, 0.0)  # padded dims: KL 0 exactly
        params = self.model.decode(self.model.reparameterize(mu, logvar, eps))  # padded dims: z = 0 + 1 * 0
        return elbo_terms(self.model.likelihood.nll(params, x), mu, logvar, beta, (capacity_on, capacity), free_bits,
                          in_use)


class VmapEngine:
    """The members' parameters, buffers and Adam moments stacked (M, ...), one vmapped step for all of them.
    The members' own modules and optimizers are brought up to date (`sync`) only when they are read."""

    name = "vmap"

    def __init__(self, members: Sequence[Trainee]):
        t = members[0]
        self.members, self.device = list(members), t.place.device
        self.latents = [m.cfg.model.latent_dim for m in members]
        self.d_max = max(self.latents)
        self.autocast = autocast_for(self.device, resolve_precision(t.cfg.trainer.precision, self.device))
        template = build_model(replace(t.cfg.model, latent_dim=self.d_max), t.cfg.data,
                               copy.deepcopy(t.objective.likelihood)).to(self.device).train()
        self.template = template
        self.step_fn = _MemberStep(template)
        models = [m.state.model for m in members]
        self.param_names = [n for n, _ in template.named_parameters()]
        self.params = {n: torch.stack([self._embed(n, dict(m.named_parameters())[n].detach(), d)
                                       for m, d in zip(models, self.latents)]).requires_grad_()
                       for n in self.param_names}
        self.buffers = {n: torch.stack([self._embed(n, b, d) for b, d in
                                        zip([dict(m.named_buffers())[n] for m in models], self.latents)])
                        for n, _ in template.named_buffers()}
        self.in_use = torch.stack([torch.arange(self.d_max, device=self.device) < d for d in self.latents])
        self.free_bits = torch.tensor([m.cfg.loss.free_bits for m in members], device=self.device)
        self.alive = torch.ones(len(members), dtype=torch.bool, device=self.device)
        self.frozen: List[int] = []
        o = t.cfg.optimizer
        self.decoupled, self.betas, self.adam_eps = o.name == "adamw", tuple(o.betas), 1e-8  # torch's default eps
        self.weight_decay = torch.tensor([m.cfg.optimizer.weight_decay for m in members], device=self.device)
        self.lr_values: List[float] = []
        self._load_moments()
        self.forward = vmap(self._member, randomness="error")

    def _embed(self, name: str, t: torch.Tensor, d: int) -> torch.Tensor:
        return pad_latent(self.template, name, t, d, self.d_max)

    def _extract(self, name: str, t: torch.Tensor, d: int) -> torch.Tensor:
        return unpad_latent(self.template, name, t, d, self.d_max)

    def _load_moments(self) -> None:
        """Adam's moments and step count from the members' optimizers (zero for a fresh pack; a resumed member's
        from its checkpoint). fit_pack admits only members resuming from the same step, so they share the count."""
        self.exp_avg, self.exp_avg_sq, self.count = {}, {}, 0
        for n in self.param_names:
            avg, sq = [], []
            for m, d in zip(self.members, self.latents):
                p = dict(m.state.model.named_parameters())[n]
                st = m.state.optimizer.state.get(p, {})
                self.count = int(float(st.get("step", 0)))
                avg.append(self._embed(n, st.get("exp_avg", torch.zeros_like(p)), d))
                sq.append(self._embed(n, st.get("exp_avg_sq", torch.zeros_like(p)), d))
            self.exp_avg[n], self.exp_avg_sq[n] = torch.stack(avg).detach(), torch.stack(sq).detach()
        self.synced = [self.count] * len(self.members)  # the count each member's own modules were last synced at

    def _member(self, params, buffers, x, eps, in_use, beta, capacity_on, capacity, free_bits):
        return functional_call(self.step_fn, ({f"model.{k}": v for k, v in params.items()},
                                              {f"model.{k}": v for k, v in buffers.items()}),
                               (x, eps, in_use, beta, capacity_on, capacity, free_bits))

    def step(self, xs: List[Optional[torch.Tensor]], eps: List[Optional[torch.Tensor]],
             step: int) -> List[Optional[Dict[str, torch.Tensor]]]:
        live = next(x for x in xs if x is not None)
        x = torch.stack([live if xi is None else xi for xi in xs]).contiguous()  # (M, B, C, H, W); frozen: any batch
        noise = next(ei for ei in eps if ei is not None)
        e = torch.stack([noise.new_zeros((len(live), self.d_max)) if ei is None else
                         nn.functional.pad(ei, (0, self.d_max - ei.shape[1])) for ei in eps])  # (M, B, D_max), 0 padded
        weights = [m.objective.weights(step) for m in self.members]  # (beta_t, capacity_t or None) per member
        f32 = dict(device=self.device, dtype=torch.float32)
        beta = torch.tensor([w[0] for w in weights], **f32)
        capacity_on = torch.tensor([w[1] is not None for w in weights], device=self.device)
        capacity = torch.tensor([w[1] or 0.0 for w in weights], **f32)
        with self.autocast:
            terms = self.forward(self.params, self.buffers, x, e, self.in_use, beta, capacity_on, capacity,
                                 self.free_bits)
        total = torch.where(self.alive, terms["loss"], 0.0).sum()  # a frozen member's (maybe NaN) loss is left out
        grads = torch.autograd.grad(total, [self.params[n] for n in self.param_names])
        self._adam(grads)
        return [None if xi is None else {**{k: terms[k][i] for k in TERMS}, "kl_per_dim": terms["kl_per_dim"][i, :d]}
                for i, (xi, d) in enumerate(zip(xs, self.latents))]

    @torch.no_grad()
    def _adam(self, grads) -> None:
        """Adam (L2 weight decay) or AdamW (decoupled) over the stacked tensors, in torch.optim's single-tensor
        order; lr and weight decay per member (M, 1, ...); frozen members keep their values."""
        lrs = [m.state.optimizer.param_groups[0]["lr"] for m in self.members]  # each member's LR schedule
        if lrs != self.lr_values:
            self.lr_values, self.lr = lrs, torch.tensor(lrs, device=self.device)
        self.count += 1
        beta1, beta2 = self.betas
        bias1, bias2_sqrt = 1 - beta1 ** self.count, math.sqrt(1 - beta2 ** self.count)
        for n, g in zip(self.param_names, grads):
            p, avg, sq = self.params[n], self.exp_avg[n], self.exp_avg_sq[n]
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr, wd = self.lr.view(shape), self.weight_decay.view(shape)
            kept = (p.clone(), avg.clone(), sq.clone()) if self.frozen else None
            if self.decoupled:
                p.mul_(1 - lr * wd)
            else:
                g = g + wd * p
            avg.lerp_(g, 1 - beta1)
            sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (sq.sqrt() / bias2_sqrt).add_(self.adam_eps)
            p.sub_((lr / bias1) * avg / denom)
            if kept is not None:
                alive = self.alive.view(shape)
                for now, before in zip((p, avg, sq), kept):
                    now.copy_(torch.where(alive, now, before))

    @torch.no_grad()
    def sync(self, i: int) -> None:
        """Member i's own model and optimizer state from its slice of the pack (before its eval or checkpoint)."""
        if self.synced[i] == self.count:  # (an eval and a checkpoint at the same step read the same state)
            return
        self.synced[i] = self.count
        m, d = self.members[i], self.latents[i]
        model, optimizer = m.state.model, m.state.optimizer
        fused = optimizer.param_groups[0].get("fused") or optimizer.param_groups[0].get("capturable")
        for n, p in model.named_parameters():
            p.copy_(self._extract(n, self.params[n][i], d))
            optimizer.state[p] = {
                "step": torch.tensor(float(self.count), dtype=torch.float32, device=p.device if fused else "cpu"),
                "exp_avg": self._extract(n, self.exp_avg[n][i], d).clone(),
                "exp_avg_sq": self._extract(n, self.exp_avg_sq[n][i], d).clone()}
        for n, b in model.named_buffers():
            b.copy_(self._extract(n, self.buffers[n][i], d))

    def freeze(self, i: int) -> None:
        self.alive[i] = False
        self.frozen.append(i)


def scratch_members(members: Sequence[Trainee]) -> List[Trainee]:
    """Copies of the members' models and optimizers for a trial timing, so the real ones are not stepped."""
    out = []
    for m in members:
        model = copy.deepcopy(m.state.model)
        optimizer, _ = build_optimizer(m.cfg.optimizer, model, fused=m.state.optimizer.param_groups[0].get("fused")
                                       or False)
        state = copy.copy(m.state)
        state.model, state.optimizer = model, optimizer
        out.append(replace(m, state=state))
    return out


def time_engine(engine_cls, members: Sequence[Trainee], steps: int = 3, warmup: int = 2) -> float:
    """Median seconds per pack step of `engine_cls` on copies of the members, on random batches."""
    scratch = scratch_members(members)
    engine = engine_cls(scratch)
    t = members[0]
    shape = (t.cfg.data.batch_size, t.cfg.data.channels, t.cfg.data.image_size, t.cfg.data.image_size)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.rand(shape, generator=gen).to(t.place.device) for _ in members]
    eps = [torch.randn(shape[0], m.cfg.model.latent_dim, generator=gen).to(t.place.device) for m in members]
    times = []
    for i in range(warmup + steps):
        synchronize(t.place.device)
        started = time.perf_counter()
        engine.step(xs, eps, i)
        synchronize(t.place.device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[warmup:])


def choose_engine(name: str, members: Sequence[Trainee]):
    """The engine `name` asks for; `auto` times a few steps of each on copies of the members and takes the faster
    (grouped kernels win for small models and lose for large ones on some devices: measure, never assume)."""
    precision = resolve_precision(members[0].cfg.trainer.precision, members[0].place.device)
    if name == "loop" or len(members) == 1:
        return LoopEngine(members)
    if precision == "fp16":  # the vmap engine has no per-member grad scaler
        if name == "vmap":
            log.warning("engine vmap does not train fp16 (a grad scaler per member); using loop")
        return LoopEngine(members)
    if name == "vmap":
        return VmapEngine(members)
    seconds = {cls.name: time_engine(cls, members) for cls in (VmapEngine, LoopEngine)}
    chosen = min(seconds, key=seconds.get)
    log.info("Pack engine auto: vmap %.1f ms, loop %.1f ms per step of all %d members -> %s",
             1e3 * seconds["vmap"], 1e3 * seconds["loop"], len(members), chosen)
    return VmapEngine(members) if chosen == "vmap" else LoopEngine(members)


# ---------------------------------------------------------------------------------------------- logs


class MemberLogs:
    """Each member's train.log in its run dir: what the pack logs for that member, and what it logs for all."""

    FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log format

    def __init__(self, run_dirs: Sequence[Path], log_name: str = "train.log"):
        self.current: Optional[int] = None
        self.handlers = []
        for i, rd in enumerate(run_dirs):
            Path(rd).mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(Path(rd) / log_name)
            handler.setFormatter(logging.Formatter(self.FORMAT))
            handler.addFilter(lambda record, i=i: self.current in (None, i))
            self.handlers.append(handler)

    def __enter__(self) -> "MemberLogs":
        for h in self.handlers:
            logging.getLogger().addHandler(h)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handlers:
            logging.getLogger().removeHandler(h)
            h.close()

    def drop(self, i: int) -> None:
        """Member i's dir is another process's: after its refusal line, nothing more of the pack's goes there."""
        logging.getLogger().removeHandler(self.handlers[i])
        self.handlers[i].close()

    @contextmanager
    def member(self, i: int) -> Iterator[None]:
        before, self.current = self.current, i
        try:
            yield
        finally:
            self.current = before


# ---------------------------------------------------------------------------------------------- the pack


def load_shared(raw_cfg) -> Shared:
    """The data and device of a pack, once: its members share the signature that decides them."""
    cfg = parse(raw_cfg)
    device = resolve_device(cfg.trainer.device)
    data = load_data(cfg.data)
    images = torch.from_numpy(np.array(data.images["train"]))
    if resolve_on_device(cfg.data.on_device, data.images["train"], device):
        images = images.to(device)
    return Shared(data, device, images, mean_image(data.images["train"]))


def member_error(e: BaseException, run_dir: Path) -> None:
    """A member that could not start or go on: its one line, as a solo member's would be (src.cli.main)."""
    label = next((text for cls, text in USER_ERRORS.items() if isinstance(e, cls)), None)
    if label is None:
        log.error("Member failed: %s: %s", type(e).__name__, e, exc_info=e)
        return
    log.error("%s: %s", label, e)
    if isinstance(e, RunDirRefused):
        note_refused_member(Path(run_dir), str(e))


def train_pack(cfgs: Sequence[Any], run_dirs: Sequence[str | Path], engine: str = "auto",
               hydra_cfgs: Optional[Sequence[Any]] = None, log_name: str = "train.log") -> List[Dict[str, Any]]:
    """Train the members `cfgs` (one run dir each) as one pack; returns each member's summary, in order.

    A member that cannot start (a bad value, a refused run dir, an unreadable checkpoint) ends with its own summary
    and line and the others go on; a finished one is skipped; one that diverges is recorded `diverged` and frozen.
    A signal stops every member at the same step boundary after each has written its checkpoint, and is raised
    (Interrupted, or Requeued on SLURM) once every member has recorded it. `hydra_cfgs`: each member's full Hydra
    config, made current while the pack works on that member (its .hydra/ files, its W&B name).
    """
    if engine not in ENGINES:
        raise ConfigError(f"hydra.launcher.engine={engine!r} is not allowed; choose one of {', '.join(ENGINES)}")
    summaries: List[Optional[Dict[str, Any]]] = [None] * len(cfgs)
    stop, logs = StopSignals(), MemberLogs(run_dirs, log_name)
    open_runs: Dict[int, RunLifecycle] = {}
    members: Dict[int, Trainee] = {}

    @contextmanager
    def on(i: int) -> Iterator[None]:
        """Working on member i: its log lines to its train.log, its Hydra config current."""
        if hydra_cfgs is not None:
            from hydra.core.hydra_config import HydraConfig

            HydraConfig.instance().set_config(hydra_cfgs[i])
        with logs.member(i):
            yield

    def end(i: int, e: Optional[BaseException]) -> None:
        run = open_runs.pop(i)
        members.pop(i, None)
        with on(i):
            run.__exit__(type(e) if e else None, e, e.__traceback__ if e else None)
            if isinstance(e, Exception):
                member_error(e, run.dir.root)
        summaries[i] = run.summary

    with stop, logs:
        try:
            shared = None
            for i, (cfg, rd) in enumerate(zip(cfgs, run_dirs)):  # 1. each member starts as a solo run would
                with on(i):
                    run = RunLifecycle(RunDir(rd), cfg, stop=stop)
                    try:
                        open_runs[i] = run.__enter__()
                    except RunDirRefused as e:  # another process holds its dir: left as it was, as a solo run's
                        member_error(e, Path(rd))
                        logs.drop(i)
                        summaries[i] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                        continue
                    try:
                        shared = shared or load_shared(cfg)
                        trainee = start(cfg, run, shared)
                    except Exception as e:
                        end(i, e)
                        continue
                    if isinstance(trainee, dict):  # finished already: skipped
                        end(i, None)
                        summaries[i] = trainee
                        continue
                    rng = MemberRNG(rng_state(), shared.device)  # the state its solo run would train on from here
                    trainee.state.get_rng, trainee.state.set_rng = rng.get, rng.set
                    trainee.rng = rng
                    members[i] = trainee
            for group in by_resume_step(members):
                fit_pack(group, engine, on, end)
            for i in list(open_runs):
                end(i, None)
        except BaseException as e:  # a signal (or a failure of the pack itself): every member still open records it
            for i in list(open_runs):  # (a member that waited for its group's turn, at its own step)
                end(i, e.at(members[i].state.step) if isinstance(e, (Interrupted, Requeued)) and i in members else e)
            raise
    return summaries


def by_resume_step(members: Dict[int, Trainee]) -> List[Dict[int, Trainee]]:
    """The members grouped by the step they resume from, earliest first; each group trains as a pack, one after
    another. One group, but for a pack stopped between two members' checkpoint writes (kill -9, a node failure)
    and then run again as it was (SLURM requeues the same job; a rerun of the sweep re-plans them instead)."""
    steps = sorted({t.state.step for t in members.values()})
    if len(steps) > 1:
        log.warning("The pack's members resume from different steps (%s); they train as %d packs, one after another",
                    ", ".join(f"member {t.run.dir.root.name} from {t.state.step}" for t in members.values()),
                    len(steps))
    return [{i: t for i, t in members.items() if t.state.step == s} for s in steps]


def fit_pack(members: Dict[int, Trainee], engine_name: str, on, end) -> None:
    """The pack's training loop: one engine step for every live member, then each member's own bookkeeping
    (log, eval, checkpoint) through the solo code; then each member's final eval."""
    order = list(members)
    ts = [members[i] for i in order]
    first = ts[0]
    steps, stop = first.objective.total_steps, first.run.stop
    refuse_unpackable([t.state.config for t in ts])
    assert len({t.state.step for t in ts}) == 1, "a pack's members share one step (by_resume_step groups them)"
    engine = choose_engine(engine_name, ts)
    for k, t in enumerate(ts):
        t.sync = lambda k=k: engine.sync(k)
        t.state.model.train()
    meter = Throughput(first.place.device)
    for t in ts:
        t.meter = meter
    log.info("Pack of %d members (%s), engine %s, from step %d of %d", len(ts),
             ", ".join(str(t.run.dir.root.name) for t in ts), engine.name, first.state.step, steps)
    precision = resolve_precision(first.cfg.trainer.precision, first.place.device)
    noise_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    streams = [t.state.batches_from_here() for t in ts]
    live = [True] * len(ts)
    stop.defer, stop.step = True, first.state.step
    bar = tqdm(total=steps, initial=first.state.step, disable=not first.cfg.trainer.progress, desc=f"pack of {len(ts)}",
               unit="step", dynamic_ncols=True)
    step = first.state.step
    while step < steps and any(live):
        xs = [next(s) if ok else None for s, ok in zip(streams, live)]
        eps = [t.rng.draw(len(x), t.cfg.model.latent_dim, noise_dtype) if x is not None else None
               for t, x in zip(ts, xs)]
        meter.before_step()
        terms = engine.step(xs, eps, step)
        lrs = [t.state.optimizer.param_groups[0]["lr"] for t in ts]  # the rates this step used
        meter.after_step(sum(len(x) for x in xs if x is not None))
        step += 1
        stop.step = step
        bar.update()
        stopping = stop.received  # read once for the step: every member checkpoints for a signal, or none yet
        for k, t in enumerate(ts):
            if not live[k]:
                continue
            t.state.advance(terms[k])
            with on(order[k]):
                try:
                    after_step(t, lrs[k], None, stopping)
                except DivergedError as e:  # this member stops as its solo run would; the others go on
                    live[k] = False
                    engine.freeze(k)
                    end(order[k], e)
        if stopping:
            stop.stop(step)
    bar.close()
    stop.defer = False
    rate = meter.images_per_s()
    for k, t in enumerate(ts):
        if not live[k]:
            continue
        with on(order[k]):
            try:
                final = finish(t)
            except Exception as e:
                end(order[k], e)
                continue
        if rate is not None:  # a member's share of the pack's rate, and the pack's
            final.update({"perf/train_images_per_s": rate / len(ts), "perf/pack_images_per_s": rate})
        final.update({"perf/pack_members": len(ts), "perf/pack_engine": engine.name})
        t.run.summary.update(final)
        with on(order[k]):
            log_finished(t.run.summary, t.run.dir.root)
        end(order[k], None)  # finished: a signal during another member's final eval does not touch it
