"""A run's training state: everything its checkpoint holds (`TrainState`), the device-side sums of its training terms
(`MetricSums`) and its own random numbers (`MemberRNG`). One definition for a solo run and for each member of a pack.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoint import rng_state
from .data import TrainBatches
from .models import fold_bn_biases


class MemberRNG:
    """A run's RNG states (what `checkpoint.rng_state()` holds: torch's CPU and CUDA generators, numpy's, Python's),
    taken from the process right after its model is built and kept apart from it from then on, so any number of runs
    share a process. Its training noise comes from `noise`, a generator in the state of the process's generator for
    the device, so a run draws the same numbers whether it trains alone or in a pack."""

    def __init__(self, device: torch.device, state: Optional[Dict[str, Any]] = None):
        self.device = device
        self.noise = torch.Generator(device)
        self.set(state if state is not None else rng_state())

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
        """(batch, latent_dim) standard normal noise for `reparameterize`."""
        return torch.randn(batch, latent_dim, generator=self.noise, device=self.device, dtype=dtype)


class MetricSums:
    """A run's training terms summed since the last log, on the device (no per-step host sync), and the first
    non-finite step with its terms, so divergence is named exactly when the host next looks. In a loop of several
    members its tensors are a row of the loop's `LoopSums`, which adds every member's step at once."""

    NAMES = ("loss", "recon_nll", "kl", "neg_elbo", "kl_penalised")  # the scalar terms of losses.elbo_terms

    def __init__(self, latent_dim: int, device: torch.device):
        self.scalars = torch.zeros(len(self.NAMES), device=device)  # (5,)
        self.kl_per_dim = torch.zeros(latent_dim, device=device)  # (D,)
        self.count = 0
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_terms = torch.zeros(len(self.NAMES), dtype=torch.bool, device=device)

    def share_divergence(self) -> None:
        """Under DDP: every rank learns the first step any rank went non-finite (a collective, so every rank calls
        it at the same steps), so all ranks stop together instead of one waiting in the next all-reduce."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.bad_step, op=dist.ReduceOp.MAX)

    def divergence(self) -> Optional[str]:
        """'non-finite loss, recon_nll at step 12' if a step went non-finite, else None (syncs the host)."""
        step = int(self.bad_step)
        if step < 0:
            return None
        names = [n for n, bad in zip(self.NAMES, self.bad_terms.tolist()) if bad]
        return f"non-finite {', '.join(names)} at step {step}"

    def pop_means(self) -> Dict[str, Any]:
        """The train/ means since the last call, as host numbers; the sums start again from zero."""
        row = {f"train/{k}": v for k, v in zip(self.NAMES, (self.scalars / self.count).tolist())}
        row["train/kl_per_dim"] = (self.kl_per_dim / self.count).tolist()
        self.scalars.zero_()
        self.kl_per_dim.zero_()
        self.count = 0
        return row

    def state_dict(self) -> Dict[str, Any]:
        return {"acc": {"scalars": self.scalars.cpu(), "kl_per_dim": self.kl_per_dim.cpu()}, "n_acc": self.count}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scalars.copy_(state["acc"]["scalars"])
        self.kl_per_dim.copy_(state["acc"]["kl_per_dim"])
        self.count = state["n_acc"]


class LoopSums:
    """The metric sums of the members of one loop, stacked: (M, 5) terms, (M, D_max) KL per dim, the first
    non-finite step of each. Each member's `MetricSums` becomes a view of its row, so one `add` per step counts
    every member's step, and a member's log, checkpoint and divergence check read its own row as before."""

    def __init__(self, sums: List[MetricSums]):
        self.rows = sums
        dims = [len(s.kl_per_dim) for s in sums]
        self.scalars = torch.stack([s.scalars for s in sums])
        self.kl_per_dim = torch.stack([nn.functional.pad(s.kl_per_dim, (0, max(dims) - d)) for s, d in zip(sums, dims)])
        self.bad_step = torch.stack([s.bad_step for s in sums])
        self.bad_terms = torch.stack([s.bad_terms for s in sums])
        self.live_list = [True] * len(sums)
        self.live = torch.ones(len(sums), dtype=torch.bool, device=self.scalars.device)
        for i, (s, d) in enumerate(zip(sums, dims)):  # each member's sums: views of its row from here
            s.scalars, s.kl_per_dim, s.bad_step, s.bad_terms = (self.scalars[i], self.kl_per_dim[i, :d],
                                                                self.bad_step[i], self.bad_terms[i])

    def add(self, terms: Dict[str, torch.Tensor], step: int) -> None:
        """One step of every live member: `terms` stacked, (M,) each and kl_per_dim (M, D_max)."""
        scalars = torch.stack([terms[k].detach().float() for k in MetricSums.NAMES], 1)  # (M, 5)
        nonfinite = ~torch.isfinite(scalars) & self.live[:, None]
        first_bad = (self.bad_step < 0) & nonfinite.any(1)
        self.bad_terms.copy_(torch.where(first_bad[:, None], nonfinite, self.bad_terms))
        self.bad_step.copy_(torch.where(first_bad, step, self.bad_step))
        self.scalars.add_(torch.where(self.live[:, None], scalars, 0.0))  # a frozen member's (maybe NaN) terms: out
        self.kl_per_dim.add_(torch.where(self.live[:, None], terms["kl_per_dim"].detach().float(), 0.0))
        for s, live in zip(self.rows, self.live_list):
            s.count += live

    def freeze(self, i: int) -> None:
        """Member i is no longer stepped."""
        self.live_list[i] = False
        self.live = torch.tensor(self.live_list, device=self.scalars.device)


def _without_folded_biases(optimizer: Dict[str, Any], model, saved_model: Dict[str, Any]) -> Dict[str, Any]:
    """An optimizer state of an earlier version, whose model had a bias on each conv before BatchNorm, without
    those parameters' moments, renumbered as this version's optimizer counts its parameters."""
    _, folded = fold_bn_biases(saved_model)
    if not folded:
        return optimizer
    saved_names = []  # the earlier model's parameters in its order: a conv's bias right after its weight
    for name, _ in model.named_parameters():
        saved_names.append(name)
        if name.endswith(".0.weight") and f"{name[:-len('weight')]}bias" in folded:
            saved_names.append(f"{name[:-len('weight')]}bias")
    renumber = {old: new for new, old in enumerate(i for i, n in enumerate(saved_names) if n not in folded)}
    return {"state": {renumber[i]: st for i, st in optimizer["state"].items() if i in renumber},
            "param_groups": [{**g, "params": [renumber[i] for i in g["params"] if i in renumber]}
                             for g in optimizer["param_groups"]]}


class TrainState:
    """Everything a checkpoint holds: the model, optimizer, LR scheduler and grad scaler, and what training
    changes besides them (step, epoch, best, the last eval, the data order, the run's RNG, the device-side metric
    sums). It is advanced before anything is logged, evaluated or saved, so a checkpoint always holds exactly what
    the next step needs; `state_dict()` is the checkpoint, `load_state_dict()` resumes from one."""

    def __init__(self, model, optimizer, scheduler, scaler, batches: TrainBatches, sums: MetricSums, rng: MemberRNG,
                 config: Dict[str, Any]):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.batches, self.sums, self.rng, self.config = batches, sums, rng, config
        self.step, self.epoch = 0, 0
        self.best = math.inf  # lowest val/neg_elbo so far, nats per image
        self.val: Dict[str, Any] = {}  # the last eval's metrics
        self.wandb_run_id: Optional[str] = None
        self.engine: Optional[str] = None  # the engine that took its steps (src/engines.py); a resumed pack keeps it

    def advance(self) -> None:
        """Count one step (its terms are in `sums`, added by the loop); an epoch's end moves the LR schedule."""
        self.step += 1
        if self.step % len(self.batches) == 0:
            self.epoch += 1
            if self.scheduler is not None:
                self.scheduler.step()

    def record_eval(self, val: Dict[str, Any]) -> bool:
        """Keep the eval's metrics; True when it is a new best."""
        self.val = val
        if val["val/neg_elbo"] < self.best:
            self.best = val["val/neg_elbo"]
            return True
        return False

    def batches_from_here(self) -> Iterator[torch.Tensor]:
        """Training batches forever, epoch after epoch, starting where the state stands."""
        while True:
            yield from self.batches.epoch(start=self.step % len(self.batches))

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "step": self.step, "epoch": self.epoch, "best": self.best, "val": self.val, "rng": self.rng.get(),
                "data": self.batches.state_dict(self.step % len(self.batches)), **self.sums.state_dict(),
                "wandb_run_id": self.wandb_run_id, "engine": self.engine, "config": self.config}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])  # (an earlier version's conv biases folded: models.fold_bn_biases)
        self.optimizer.load_state_dict(_without_folded_biases(state["optimizer"], self.model, state["model"]))
        self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.best, self.val = state["step"], state["epoch"], state["best"], state["val"]
        self.batches.load_state_dict(state["data"])
        self.sums.load_state_dict(state)
        self.rng.set(state["rng"])
        self.engine = state.get("engine")  # (None in a checkpoint of an earlier version)
