"""How the loop's training step is taken for the members it holds (src/loop.py; a solo run is a loop of one member).

- `loop` (`DenseEngine`): each member's own model and torch.optim optimizer, one after another, through `TrainStep`
  (compiled where asked, under DDP where a run has several ranks). A solo run is this engine with one member; a
  pack's members trained this way are bitwise their solo runs.
- `vmap` (`VmapEngine`): the members' parameters stacked (M, ...) and one `torch.func.vmap` of the model over them
  (convolutions become grouped ones, linears batched matmuls, BatchNorm keeps per-member statistics), then one
  Adam/AdamW over the stacked tensors with per-member lr and weight decay, in torch.optim's order. A member with a
  smaller `model.latent_dim` is padded to the largest and masked: its extra dims have mu = logvar = 0 and zero
  noise, so they carry exactly zero KL, feed zero into the decoder and get zero gradient.

Every engine draws each member's noise from that member's own generator (`state.rng`), so a member's numbers do not
depend on who shares its loop. Every operation of the vmap engine is block-diagonal over members: it differs from
a member's solo run only by summation order (docs/sweeps.md says by how much).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, vmap

from .config import ConfigError
from .device import autocast_dtype, autocast_for, resolve_compile, resolve_precision
from .losses import Objective, elbo_terms
from .metrics import batch_sums, one_by_one
from .models import build_model
from .state import MetricSums

if TYPE_CHECKING:
    from .member import Member

log = logging.getLogger(__name__)

ENGINES = ("auto", "loop", "vmap")  # hydra.launcher.engine
# where the vmap engine evaluates its members in one vmapped pass (elsewhere member by member, with the same numbers):
# on a 2-core CPU the vmapped pass of 16 small members' test evals took 19.5 s against 13.7 s one by one (40.9 s
# against 20.3 s before its convs were NHWC); most of the gap is BatchNorm's eval-mode batch rule (7.1 s against
# 1.5 s, elementwise ops over the broadcast running statistics); on a GPU one pass replaces M launches of every kernel
VMAP_EVALS_ON = {"cuda"}
Terms = Dict[str, torch.Tensor]


def check_engine_name(name: str) -> None:
    if name not in ENGINES:
        raise ConfigError(f"hydra.launcher.engine={name!r} is not allowed; choose one of {', '.join(ENGINES)}")


class TrainStep:
    """One member's optimisation step, through the compiled model when asked. A compiler that fails on the first
    step must not cost the run: it falls back to eager with a warning (`compile_mode` then says off)."""

    def __init__(self, model, objective: Objective, optimizer, scaler, autocast, compile_mode, world_size: int):
        self.eager = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
        self.net = torch.compile(self.eager, mode=compile_mode) if compile_mode else self.eager
        self.objective, self.optimizer, self.scaler, self.autocast = objective, optimizer, scaler, autocast
        self.compile_mode, self.taken = compile_mode, 0

    def __call__(self, x: torch.Tensor, eps: torch.Tensor, step: int) -> Terms:
        """Batch x (B, C, H, W) and noise eps (B, latent_dim) at `step` -> the terms, still on the device."""
        try:
            terms = self._step(x, eps, step)
        except Exception as e:
            if self.net is self.eager or self.taken:
                raise
            log.warning("trainer.compile=%s failed on the first step (%s); training eagerly", self.compile_mode,
                        str(e).splitlines()[0][:200])
            self.net, self.compile_mode = self.eager, False
            terms = self._step(x, eps, step)
        self.taken += 1
        return terms

    def _step(self, x: torch.Tensor, eps: torch.Tensor, step: int) -> Terms:
        if self.compile_mode == "reduce-overhead":  # each graph's outputs are read before the next replay
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast:
            params, mu, logvar = self.net(x, eps)
            terms = self.objective(params, x, mu, logvar, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return terms


class DenseEngine:
    """Each member's own dense step, one after another (engine `loop`; a solo run's, with compile and DDP)."""

    name = "loop"

    def __init__(self, members: Sequence["Member"]):
        first = members[0]
        device, world_size = first.place.device, first.place.world_size
        self.precision = resolve_precision(first.cfg.trainer.precision, device)
        mode = resolve_compile(first.cfg.trainer.compile, device, world_size)
        self.members = list(members)
        self.steps = [TrainStep(m.state.model, m.objective, m.state.optimizer, m.state.scaler,
                                autocast_for(device, self.precision), mode, world_size) for m in members]

    @property
    def compile_mode(self) -> str:
        """The compile mode the steps run with (after any fallback to eager): off, default or reduce-overhead."""
        return self.steps[0].compile_mode or "off"

    def step(self, xs: List[Optional[torch.Tensor]], step: int) -> Terms:
        """One step of each member with a batch (a frozen member's is None); the terms stacked over members."""
        dtype = autocast_dtype(self.precision)
        terms = [None if x is None else take(x, m.state.rng.draw(len(x), m.cfg.model.latent_dim, dtype), step)
                 for take, m, x in zip(self.steps, self.members, xs)]
        return stack_terms(terms, max(m.cfg.model.latent_dim for m in self.members))

    def eval_map(self, which: List[int]):
        """The eval of members `which` (metrics.evaluate's mapper): each member's own model in turn."""
        return one_by_one([self.members[i].state.model for i in which])

    def sync(self, i: int) -> None:
        """The members' own modules are the live ones."""

    def freeze(self, i: int) -> None:
        """A frozen member is no longer stepped (its batch is None)."""


def stack_terms(terms: List[Optional[Terms]], d_max: int) -> Terms:
    """Members' terms as the loop adds them: (M,) each, kl_per_dim (M, d_max) zero-padded; a member without terms
    (frozen) has zeros."""
    some = next(t for t in terms if t is not None)
    zero = {k: torch.zeros_like(some[k]) for k in MetricSums.NAMES}
    out = {k: torch.stack([(t or zero)[k] for t in terms]) for k in MetricSums.NAMES}
    out["kl_per_dim"] = torch.stack([nn.functional.pad(t["kl_per_dim"], (0, d_max - len(t["kl_per_dim"])))
                                     if t is not None else some["kl_per_dim"].new_zeros(d_max) for t in terms])
    return out


def stack_channels_last(ts: List[torch.Tensor], members_outer: bool) -> torch.Tensor:
    """Members' 4-D tensors (N, C, H, W) -> (M, N, C, H, W), laid out in memory for vmap's grouped convs: vmap turns
    a member-batched conv into one conv with groups=M, whose input is the batches as (B, M * C, H, W) and whose
    weight is the members' as (M * C_out, C_in, kh, kw). oneDNN's grouped kernels want both NHWC (on a 2-core CPU,
    16 small members: the stride-1 output conv's forward and backward 35 -> 12 ms); then each conv's output is NHWC
    too, layer after layer. A batch is laid out (B, H, W, M, C) (members_outer False); a weight (M, C_out, kh, kw,
    C_in) (members_outer True)."""
    n, c, h, w = ts[0].shape
    out = ts[0].new_empty((len(ts), n, h, w, c) if members_outer else (n, h, w, len(ts), c))
    for k, t in enumerate(ts):
        (out[k] if members_outer else out[:, :, :, k]).copy_(t.permute(0, 2, 3, 1))
    return out.permute(0, 1, 4, 2, 3) if members_outer else out.permute(3, 0, 4, 1, 2)


def pad_latent(kind: Optional[str], t: torch.Tensor, d: int, d_max: int) -> torch.Tensor:
    """A latent-d member's tensor as it sits in a pack of latent d_max (`kind` from VAE.latent_layout): "rows" puts
    mu rows at [0, d) and logvar rows at [d_max, d_max + d); "columns" puts decoder columns at [0, d); zero
    elsewhere. Other tensors (kind None) are as they are."""
    if d == d_max or kind is None:
        return t
    if kind == "rows":
        out = t.new_zeros((2 * d_max, *t.shape[1:]))
        out[:d], out[d_max:d_max + d] = t[:d], t[d:]
        return out
    out = t.new_zeros((t.shape[0], d_max))
    out[:, :d] = t
    return out


def unpad_latent(kind: Optional[str], t: torch.Tensor, d: int, d_max: int) -> torch.Tensor:
    """The inverse of pad_latent: the member's own tensor."""
    if d == d_max or kind is None:
        return t
    return torch.cat([t[:d], t[d_max:d_max + d]]) if kind == "rows" else t[:, :d]


class MemberStep(nn.Module):
    """One member's forward pass and ELBO terms, written for vmap: its settings come as tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, eps, in_use, beta, capacity_on, capacity, free_bits):
        mu, logvar = self.model.encode(x)  # (B, D_max) each
        mu, logvar = torch.where(in_use, mu, 0.0), torch.where(in_use, logvar, 0.0)  # padded dims: KL 0 exactly
        params = self.model.decode(self.model.reparameterize(mu, logvar, eps))  # padded dims: z = 0 + 1 * 0
        return elbo_terms(self.model.likelihood.nll(params, x), mu, logvar, beta, capacity_on, capacity, free_bits,
                          in_use)


class MemberEval(nn.Module):
    """One member's eval of a batch (metrics.batch_sums), written for vmap: its noise and settings come as tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, mean_img, settings, eps, iwae, iwae_m, in_use):
        return batch_sums(self.model, x, mean_img, settings, eps, iwae, iwae_m, in_use)


class VmapEngine:
    """The members' parameters, buffers and Adam moments stacked (M, ...), one vmapped step for all of them.
    The members' own modules and optimizers are brought up to date (`sync`) only when they are read."""

    name = "vmap"
    compile_mode = "off"

    def __init__(self, members: Sequence["Member"]):
        first = members[0]
        self.members, self.device = list(members), first.place.device
        self.latents = [m.cfg.model.latent_dim for m in members]
        self.d_max = max(self.latents)
        self.precision = resolve_precision(first.cfg.trainer.precision, self.device)
        self.autocast = autocast_for(self.device, self.precision)
        self.channels_last = first.state.batches.memory_format == torch.channels_last
        template = build_model(replace(first.cfg.model, latent_dim=self.d_max), first.cfg.data,
                               copy.deepcopy(first.objective.likelihood)).to(self.device).train()
        self.layout = template.latent_layout()
        self.step_fn, self.eval_fn = MemberStep(template), MemberEval(template)
        models = [m.state.model for m in members]
        self.param_names = [n for n, _ in template.named_parameters()]
        self.params = {n: self._stack([self._embed(n, dict(m.named_parameters())[n].detach(), d)
                                       for m, d in zip(models, self.latents)]).requires_grad_()
                       for n in self.param_names}
        self.buffers = {n: torch.stack([self._embed(n, dict(m.named_buffers())[n], d)
                                        for m, d in zip(models, self.latents)])
                        for n, _ in template.named_buffers()}
        self.in_use = torch.stack([torch.arange(self.d_max, device=self.device) < d for d in self.latents])
        self.alive = torch.ones(len(members), dtype=torch.bool, device=self.device)
        self.frozen: List[int] = []
        o = first.cfg.optimizer
        self.decoupled, self.betas, self.adam_eps = o.name == "adamw", tuple(o.betas), 1e-8  # torch's default eps
        self.weight_decay = torch.tensor([m.cfg.optimizer.weight_decay for m in members], device=self.device)
        self.lr_values: List[float] = []
        self.settings_values: List[tuple] = []
        self._load_moments()
        self.forward = vmap(self._member, randomness="error")

    def _stack(self, ts: List[torch.Tensor]) -> torch.Tensor:
        """Members' tensors stacked (M, ...); conv weights laid out for the grouped conv under channels_last."""
        if self.channels_last and ts[0].dim() == 4:
            return stack_channels_last(ts, members_outer=True)
        return torch.stack(ts)

    def _embed(self, name: str, t: torch.Tensor, d: int) -> torch.Tensor:
        return pad_latent(self.layout.get(name), t, d, self.d_max)

    def _extract(self, name: str, t: torch.Tensor, d: int) -> torch.Tensor:
        return unpad_latent(self.layout.get(name), t, d, self.d_max)

    def _load_moments(self) -> None:
        """Adam's moments and step count from the members' optimizers (zero for a fresh pack; a resumed member's
        from its checkpoint). The loop admits only members at one step, so they share the count."""
        self.exp_avg, self.exp_avg_sq, self.count = {}, {}, 0
        for n in self.param_names:
            avg, sq = [], []
            for m, d in zip(self.members, self.latents):
                p = dict(m.state.model.named_parameters())[n]
                st = m.state.optimizer.state.get(p, {})
                self.count = int(float(st.get("step", 0)))
                avg.append(self._embed(n, st.get("exp_avg", torch.zeros_like(p)), d))
                sq.append(self._embed(n, st.get("exp_avg_sq", torch.zeros_like(p)), d))
            self.exp_avg[n], self.exp_avg_sq[n] = self._stack(avg).detach(), self._stack(sq).detach()
        self.synced = [self.count] * len(self.members)  # the count each member's own modules were last synced at

    def _member(self, params, buffers, x, eps, in_use, beta, capacity_on, capacity, free_bits):
        return functional_call(self.step_fn, ({f"model.{k}": v for k, v in params.items()},
                                              {f"model.{k}": v for k, v in buffers.items()}),
                               (x, eps, in_use, beta, capacity_on, capacity, free_bits))

    def step(self, xs: List[Optional[torch.Tensor]], step: int) -> Terms:
        """One vmapped step of all members (a frozen member's batch is None: it is fed any batch and left out of
        the loss and the update); the terms stacked over members."""
        live = next(x for x in xs if x is not None)
        dtype = autocast_dtype(self.precision)
        x = [live if xi is None else xi for xi in xs]  # frozen: any batch
        x = stack_channels_last(x, members_outer=False) if self.channels_last else torch.stack(x)  # (M, B, C, H, W)
        e = torch.stack([live.new_zeros((len(live), self.d_max), dtype=dtype) if xi is None else  # (M, B, D_max)
                         nn.functional.pad(m.state.rng.draw(len(xi), d, dtype), (0, self.d_max - d))
                         for m, xi, d in zip(self.members, xs, self.latents)])
        with self.autocast:
            terms = self.forward(self.params, self.buffers, x, e, self.in_use, *self._settings(step))
        total = torch.where(self.alive, terms["loss"], 0.0).sum()  # a frozen member's (maybe NaN) loss is left out
        grads = torch.autograd.grad(total, [self.params[n] for n in self.param_names])
        self._adam(grads)
        return {k: terms[k] for k in (*MetricSums.NAMES, "kl_per_dim")}

    def _settings(self, step: int) -> List[torch.Tensor]:
        """Each member's (beta_t, capacity on, C_t, free bits) at `step`, as (M,) tensors, made anew only when a
        schedule moves them."""
        settings = [m.objective.settings(step) for m in self.members]
        if settings != self.settings_values:
            self.settings_values = settings
            self.settings_tensors = [torch.tensor(v, device=self.device) for v in zip(*settings)]
        return self.settings_tensors

    def eval_map(self, which: List[int]):
        """The eval of members `which` (metrics.evaluate's mapper): on a device in VMAP_EVALS_ON one vmapped pass of
        batch_sums over the stacked members in eval mode (a member not asked for is fed zero noise, and its sums are
        dropped); elsewhere each member's own (synced) model in turn."""
        if self.device.type not in VMAP_EVALS_ON:
            return one_by_one([self.members[i].state.model for i in which])

        def apply(x, mean_img, settings, eps, iwae, iwae_m):
            pad = lambda t, d: nn.functional.pad(t, (0, self.d_max - d))  # noqa: E731
            chunks = len(iwae[0])
            full_s, full_e, full_n = [settings[0]] * len(self.members), [], []
            given = dict(zip(which, zip(settings, eps, iwae)))
            for i, d in enumerate(self.latents):
                s_i, e_i, n_i = given.get(i, (settings[0], eps[0].new_zeros((len(x), d)),
                                              [t.new_zeros((*t.shape[:2], d)) for t in iwae[0]]))
                full_s[i] = s_i
                full_e.append(pad(e_i, d))
                full_n.append([pad(t, d) for t in n_i])
            stacked_s = [torch.stack(v) for v in zip(*full_s)]
            stacked_n = [torch.stack([n[j] for n in full_n]) for j in range(chunks)]
            self.eval_fn.eval()
            try:
                out = vmap(partial(self.eval_member, iwae_m=iwae_m), in_dims=(0, 0, None, None, 0, 0, 0, 0),
                           randomness="error")(self.params, self.buffers, x, mean_img, stacked_s, torch.stack(full_e),
                                               stacked_n, self.in_use)
            finally:
                self.eval_fn.train()
            return [{k: (v[i][..., :self.latents[i]] if k in ("mu", "logvar", "kl_per_dim") else v[i])
                     for k, v in out.items()} for i in which]

        return apply

    def eval_member(self, params, buffers, x, mean_img, settings, eps, iwae, in_use, iwae_m):
        """One member's batch_sums on its slice of the stacks: the function the vmapped eval maps over members."""
        return functional_call(self.eval_fn, ({f"model.{k}": v for k, v in params.items()},
                                              {f"model.{k}": v for k, v in buffers.items()}),
                               (x, mean_img, settings, eps, iwae, iwae_m, in_use))

    @torch.no_grad()
    def _adam(self, grads) -> None:
        """Adam (L2 weight decay) or AdamW (decoupled) over the stacked tensors, in torch.optim's single-tensor
        order, each operation once over every tensor (torch._foreach_*: the same arithmetic, one call for all); lr
        and weight decay per member, as (M, 1, ...) views; frozen members keep their values."""
        lrs = [m.state.optimizer.param_groups[0]["lr"] for m in self.members]  # each member's LR schedule
        if lrs != self.lr_values:
            self.lr_values, self.lr = lrs, torch.tensor(lrs, device=self.device)
        self.count += 1
        beta1, beta2 = self.betas
        bias1, bias2_sqrt = 1 - beta1 ** self.count, math.sqrt(1 - beta2 ** self.count)
        params = [self.params[n] for n in self.param_names]
        avgs, sqs = [self.exp_avg[n] for n in self.param_names], [self.exp_avg_sq[n] for n in self.param_names]
        per_member = lambda t: [t.view((-1,) + (1,) * (p.dim() - 1)) for p in params]  # noqa: E731
        kept = [(p.clone(), a.clone(), q.clone()) for p, a, q in zip(params, avgs, sqs)] if self.frozen else None
        if self.decoupled:
            torch._foreach_mul_(params, per_member(1 - self.lr * self.weight_decay))
        else:
            grads = torch._foreach_add(grads, torch._foreach_mul(per_member(self.weight_decay), params))
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(sqs)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, self.adam_eps)
        update = torch._foreach_mul(per_member(self.lr / bias1), avgs)
        torch._foreach_div_(update, denom)
        torch._foreach_sub_(params, update)
        if kept is not None:
            for p, a, q, before, alive in zip(params, avgs, sqs, kept, per_member(self.alive)):
                for now, was in zip((p, a, q), before):
                    now.copy_(torch.where(alive, now, was))

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


# ---------------------------------------------------------------------------------------------- choosing one


CPU_VMAP_MAX_FLOPS = 0.5e6  # forward FLOPs per image per member up to which vmap wins on a CPU (docs/speed.md)


def forward_flops(member: "Member") -> float:
    """FLOPs of one image's forward pass through the member's model (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    d = member.cfg.data
    model = copy.deepcopy(member.state.model).cpu().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, d.channels, d.image_size, d.image_size), torch.zeros(1, member.cfg.model.latent_dim))
    return float(counter.get_total_flops())


def decide_engine(name: str, members: Sequence["Member"]) -> tuple:
    """(engine name, why) for a loop of `members`: the one asked for; for `auto`, the one the members' checkpoints
    record (a resumed pack keeps its engine, so its numbers are those it would have given unstopped), else a rule
    by device, precision and model size, measured (docs/speed.md), never a race: the same command gives the same
    engine, and the same numbers."""
    check_engine_name(name)
    precision = resolve_precision(members[0].cfg.trainer.precision, members[0].place.device)
    if len(members) == 1:
        return "loop", "one member"
    if precision == "fp16" and name != "loop":  # the vmap engine has no per-member grad scaler
        return "loop", "fp16 needs a grad scaler per member"
    if name != "auto":
        return name, "asked for"
    recorded = {m.state.engine for m in members}
    if len(recorded) == 1 and None not in recorded:
        return recorded.pop(), "as the members' checkpoints record"
    device = members[0].place.device
    if device.type == "cuda":
        return "vmap", "CUDA: one grouped kernel for every member"
    flops = forward_flops(members[0])
    if flops <= CPU_VMAP_MAX_FLOPS:
        return "vmap", f"{device.type}, {flops / 1e6:.2f} MFLOP per image per member (at most {CPU_VMAP_MAX_FLOPS / 1e6:g})"
    return "loop", f"{device.type}, {flops / 1e6:.2f} MFLOP per image per member: grouped kernels lose above " \
                   f"{CPU_VMAP_MAX_FLOPS / 1e6:g}"


def choose_engine(name: str, members: Sequence["Member"]) -> Any:
    """The engine of a loop of `members` (decide_engine), logged with its reason."""
    chosen, why = decide_engine(name, members)
    if len(members) > 1:
        log.info("Pack engine %s (%s)", chosen, why)
    return VmapEngine(members) if chosen == "vmap" else DenseEngine(members)
