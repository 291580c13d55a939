"""Run logging: metrics.jsonl for machines (one flat JSON object per log or eval step, with "step"), and
Weights & Biases when `logger=wandb` (online, offline, or off; never a reason for a run to fail or hang)."""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
import netrc
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple
from urllib.parse import urlparse

from .config import LoggerConfig
from .naming import run_identity, run_tags
from .rundir import RunDir, plain, write_text

log = logging.getLogger(__name__)

LOGGERS = ("none", "wandb")
LOGGER_MODES = ("auto", "online", "offline", "disabled")


# ------------------------------------------------------------------------------------------- W&B


def wandb_mode(mode: str) -> str:
    """WANDB_MODE from the environment wins; `auto` is online with credentials, offline without."""
    if os.environ.get("WANDB_MODE") == "":  # as env files and CI templates leave it: unset, not a mode
        del os.environ["WANDB_MODE"]  # (wandb itself refuses the empty string)
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if mode != "auto":
        return mode
    return "online" if _has_credentials() else "offline"


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")


# After W&B could not be used online, the runs this process starts in the next OFFLINE_MEMORY_S go offline at once:
# the members of a pack (or of a sweep run in one process) would otherwise each wait logger.init_timeout for the
# same silent server before training. Keyed by server; the time is the failure's, so the server is asked again later.
OFFLINE_MEMORY_S = 600.0
_went_offline: Dict[str, Tuple[float, str]] = {}


def _offline_lately(base: str) -> Optional[str]:
    if base not in _went_offline:
        return None
    when, reason = _went_offline[base]
    ago = time.monotonic() - when
    return f"{reason}; as for this process's run {ago:.0f} s ago" if ago < OFFLINE_MEMORY_S else None


def wandb_unreachable(timeout: float) -> Optional[str]:
    """Why the W&B server cannot be used now (refused, timed out, an HTTP error, a page that is not the API), or
    None when it answers. One small GraphQL request, bounded by `timeout` seconds in all (a socket timeout bounds
    each read only: a server that trickles its answer would hold it for ever), in a thread that is left behind
    when it overruns; wandb.init's own checks can take longer than logger.init_timeout on a node without internet."""
    answer: Dict[str, Optional[str]] = {}
    probe = threading.Thread(target=lambda: answer.setdefault("reason", _probe(timeout)), daemon=True)
    probe.start()
    probe.join(timeout)
    if "reason" not in answer:
        return f"{wandb_base_url()} gave no whole answer within {timeout:g} s"
    return answer["reason"]


def _probe(timeout: float) -> Optional[str]:
    base = wandb_base_url()
    request = urllib.request.Request(f"{base}/graphql", data=b'{"query": "{ viewer { id } }"}',
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            json.loads(response.read(1 << 20))
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            return f"{base} answered HTTP {e.code}"
    except (OSError, ValueError) as e:  # refused, unreachable, timed out; or not JSON (a proxy's HTML page)
        reason = getattr(e, "reason", None) or e
        return f"{base} gave no API answer ({type(reason).__name__}: {str(reason).splitlines()[0][:120]})"
    return None


def start_wandb(cfg: LoggerConfig, run_dir: Path, config: Dict[str, Any], name: Optional[str] = None,
                group: Optional[str] = None, job_type: str = "train", quiet: bool = False, hydra_cfg: Any = None):
    """wandb.init with the files in the run dir; the run id is kept there so a resume continues the run.

    If the server cannot be used online (unreachable, refusing, erroring, silent), the run goes on offline
    within logger.init_timeout and says so in one line; a rerun into the same dir does the same.
    """
    import wandb

    mode = wandb_mode(cfg.mode)
    if mode == "disabled":
        return None
    run_id = wandb_run_id(Path(run_dir))
    if name is None:
        name, group = run_identity(run_dir, cfg.group, hydra_cfg)
    tags = run_tags(config, hydra_cfg) if job_type == "train" else None
    kwargs = dict(project=cfg.project, entity=cfg.entity, dir=str(run_dir), id=run_id, resume="allow", name=name,
                  group=group, job_type=job_type, config=config, tags=tags,
                  settings=wandb.Settings(init_timeout=cfg.init_timeout, console="off", silent=quiet),
                  reinit="create_new")  # the members of a pack each hold a run of their own in one process
    started, base = time.monotonic(), wandb_base_url()
    lately = _offline_lately(base) if mode == "online" else None
    reason = lately or (wandb_unreachable(cfg.init_timeout) if mode == "online" else None)
    run = None
    if mode == "offline" or reason is None:
        try:
            run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # W&B must never stop the training
            if mode != "online":
                raise
            reason = str(e).splitlines()[0][:160]
            wandb.teardown()  # forget the half-started online run, or the offline one is refused as "in use"
    if run is None:
        if lately is None:
            _went_offline[base] = (time.monotonic(), reason)
        (log.debug if quiet else log.warning)(  # quiet: a failure's record, whose own line is the news
            "W&B unreachable (%s) after %.1f s; logging offline in %s, upload later with `wandb sync`",
            reason, time.monotonic() - started, run_dir / "wandb")
        os.environ["WANDB_ERROR_REPORTING"] = "false"  # W&B's own telemetry would wait on the same server at exit
        run = wandb.init(mode="offline", **kwargs)
    run.define_metric("step")
    for prefix in ("train", "val", "test", "perf"):  # every chart shares the training-step axis
        run.define_metric(f"{prefix}/*", step_metric="step")
    run.define_metric("val/neg_elbo", step_metric="step", summary="min")
    return run


def record_failure(raw_cfg: Any, run_dir: Path, summary: Dict[str, Any], hydra_cfg: Any = None) -> None:
    """A run that failed before its logger started (a bad value, unreadable data) still gets a W&B run, marked
    failed with its error, when the logger section itself is usable. Best effort: never masks the real error.

    raw_cfg is the composed config as given (a DictConfig), since the failure may be that it does not parse.
    """
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LoggerConfig), raw_cfg.get("logger") or {}))
        if cfg.name != "wandb":
            return
        run = start_wandb(cfg, Path(run_dir), OmegaConf.to_container(raw_cfg), quiet=True,  # the error is the news
                          hydra_cfg=hydra_cfg)
        if run is not None:
            run.summary.update({k: plain(v) for k, v in summary.items()})
            run.finish(exit_code=1)
    except Exception as e:  # the original error is the one to report
        log.debug("could not record the failure in W&B: %s", e)


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run dir: under a W&B agent the sweep chooses it; otherwise a rerun into the dir
    continues its run, and a copy of the dir (the file names the folder it was made in) starts a run of its own
    rather than writing over the original's."""
    id_file, here = RunDir(run_dir).wandb_run_id, str(Path(run_dir).resolve())
    kept, _, made_in = (id_file.read_text().strip() if id_file.is_file() else "").partition(" ")
    if made_in and made_in != here:  # (a file of an older release holds only the id: kept)
        log.info("This run dir is a copy of %s: it gets a W&B run of its own", made_in)
        kept = ""
    run_id = kept or os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)
    write_text(id_file, f"{run_id} {here}\n")
    return run_id


# ------------------------------------------------------------------------------------------- the logger


STOPPED_TAG = "interrupted"  # on W&B: a run stopped on purpose (Ctrl-C, SIGTERM), resumable


def tag_ended_run(run_dir: Path, config: Dict[str, Any], hydra_cfg: Any, tags: Sequence[str],
                  summary: Dict[str, Any]) -> None:
    """Tags and summary keys for a run that has ended and will not train again (a study's pruned trial): its W&B
    run resumed for a moment under its own id and logger settings (`config`: its nested record), its tags those it
    had plus `tags`. Nothing for a run without a W&B run; a W&B failure here is one warning."""
    cfg = LoggerConfig(**config.get("logger", {}))
    if cfg.name != "wandb" or not RunDir(run_dir).wandb_run_id.is_file():
        return
    from .config import applying

    try:
        run = start_wandb(cfg, Path(run_dir), applying(config), hydra_cfg=hydra_cfg, quiet=True)
        if run is not None:
            run.tags = (*(run.tags or ()), *tags)
            run.summary.update(summary)
            run.finish()
    except Exception as e:  # the study must not stop for a dashboard's tag
        log.warning("W&B could not tag the run in %s %s (%s: %s)", run_dir, list(tags), type(e).__name__,
                    str(e).splitlines()[0][:160] if str(e) else "")


class RunLogger:
    """Appends one flat JSON line per call to `<run_dir>/metrics.jsonl`, and mirrors it to W&B when on."""

    def __init__(self, run_dir: Path, cfg: Optional[LoggerConfig] = None, config: Optional[Dict[str, Any]] = None,
                 hydra_cfg: Any = None):
        self.path = RunDir(run_dir).metrics
        self.file = open(self.path, "a", buffering=1)
        self.wandb = None
        if cfg is not None and cfg.name == "wandb":
            self._guarded("start", lambda: setattr(self, "wandb", start_wandb(cfg, Path(run_dir), config or {},
                                                                               hydra_cfg=hydra_cfg)))
        self.run_id = self.wandb.id if self.wandb is not None else None

    def _guarded(self, what: str, call) -> None:
        """Nothing W&B does after the start check may fail the trainer: an error turns W&B off for this run,
        with one warning; metrics.jsonl and summary.json go on as always."""
        try:
            call()
        except Exception as e:
            log.warning("W&B failed to %s (%s: %s); going on without W&B, metrics.jsonl keeps every step", what,
                        type(e).__name__, str(e).splitlines()[0][:160] if str(e) else "")
            self.wandb = None

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        self.file.write(json.dumps({"step": step, **{k: plain(v) for k, v in metrics.items()}}) + "\n")
        if self.wandb is not None:
            self._guarded("log", lambda: self.wandb.log({"step": step, **_wandb_values(metrics)}))

    def log_images(self, images: Dict[str, Path], step: int, prefix: str = "val") -> None:
        """Grids are PNG files in the run dir already; W&B gets them as images."""
        if self.wandb is not None:
            import wandb

            self._guarded("log images", lambda: self.wandb.log(
                {"step": step, **{f"{prefix}/{k}": wandb.Image(str(p)) for k, p in images.items()}}))

    def finish(self, summary: Dict[str, Any]) -> None:
        """Close metrics.jsonl; on W&B, summary.json becomes the run summary, and the exit code says failed (a
        requeued run is marked preempting first)."""
        self.file.close()
        if self.wandb is not None:
            run = self.wandb
            if summary.get("status") == "requeued":  # W&B shows the run as preempted, not failed; the requeued job
                self._guarded("mark_preempting", run.mark_preempting)  # continues it under the same id
            if summary.get("status") == "interrupted":  # W&B has no state for a run stopped on purpose (its exit
                # code makes it "failed"): a tag to filter by, which a resume under the same id drops (run_tags)
                self._guarded("tag", lambda: setattr(run, "tags", (*(run.tags or ()), STOPPED_TAG)))
            self._guarded("finish", lambda: (run.summary.update({k: plain(v) for k, v in summary.items()}),
                                             run.finish(exit_code=0 if summary.get("status") == "finished" else 1)))
            self.wandb = None


def _wandb_values(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Scalars as they are; per-dim lists as a bar chart a person can read (plus the table behind it)."""
    import wandb

    out = {}
    for k, v in metrics.items():
        if isinstance(v, (list, tuple)) and k.startswith("train/"):  # per dim as scalars, no chart every log step:
            width = len(str(len(v) - 1))  # train/kl_per_dim/03 overlays dim by dim across runs
            out.update({f"{k}/{d:0{width}d}": plain(x) for d, x in enumerate(v)})
            continue
        if isinstance(v, (list, tuple)):
            table = wandb.Table(data=[[d, x] for d, x in enumerate(v)], columns=["dim", "kl_nats"])
            out[k] = wandb.plot.bar(table, "dim", "kl_nats", title=f"{k} (nats per image)")
            width = len(str(len(v) - 1))  # and one scalar per dim, so runs overlay dim by dim: val/kl_per_dim/03
            out.update({f"{k}/{d:0{width}d}": plain(x) for d, x in enumerate(v)})
        else:
            out[k] = plain(v)
    return out


# ------------------------------------------------------------------------------------------- train.log


def own_log_files(run_dir: Path) -> None:
    """A log file of the root logger in `run_dir` (Hydra's train.log) that is a symlink someone left there is
    replaced by a file of the run's own, not written through (docs/runs.md): Hydra opened it, following the link,
    before the run began, and wrote nothing to it yet. Log files a user configured elsewhere are theirs."""
    for handler in logging.getLogger().handlers:
        path = Path(getattr(handler, "baseFilename", ""))  # (absolute, links not resolved)
        if isinstance(handler, logging.FileHandler) and path.parent == Path(run_dir).absolute() and path.is_symlink():
            path.unlink()
            handler.setStream(open(path, handler.mode, encoding=handler.encoding)).close()


class MemberLogs:
    """Each member's train.log in its run dir, for several members trained in one process (a pack): the lines logged
    while the loop works on a member go to that member's file, the lines it logs for all of them to every file."""

    FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log format

    def __init__(self, run_dirs: Sequence[Path], log_name: str = "train.log"):
        self.current: Optional[Path] = None
        self.handlers: Dict[Path, logging.Handler] = {}
        for rd in map(Path, run_dirs):
            rd.mkdir(parents=True, exist_ok=True)
            if (rd / log_name).is_symlink():  # a link someone left there: replaced, never written through
                (rd / log_name).unlink()
            handler = logging.FileHandler(rd / log_name)
            handler.setFormatter(logging.Formatter(self.FORMAT))
            handler.addFilter(lambda record, rd=rd: self.current in (None, rd))
            self.handlers[rd] = handler

    def __enter__(self) -> "MemberLogs":
        for h in self.handlers.values():
            logging.getLogger().addHandler(h)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handlers.values():
            logging.getLogger().removeHandler(h)
            h.close()

    def drop(self, run_dir: Path) -> None:
        """The member's dir is another process's: after its refusal line, nothing more of the pack's goes there."""
        handler = self.handlers[Path(run_dir)]
        logging.getLogger().removeHandler(handler)
        handler.close()

    @contextmanager
    def member(self, run_dir: Path) -> Iterator[None]:
        before, self.current = self.current, Path(run_dir)
        try:
            yield
        finally:
            self.current = before
