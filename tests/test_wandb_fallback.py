"""W&B never takes a run down: with an API key set (WANDB_MODE unset, as on a compute node), a W&B server that
refuses, errors, answers with a proxy's HTML page or never answers sends the run offline within
logger.init_timeout, in one line, and a rerun into the same dir works. The servers are real, on loopback."""
from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .conftest import leet, run_cli

SECRET = "f00dfeed" * 5  # a 40-character API key that must never be written anywhere
TIMEOUT = 3  # logger.init_timeout, seconds


def _handler(kind: str, stop: threading.Event):
    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            if kind == "silent":
                stop.wait(60)  # holds the connection open and says nothing, until the test ends
                return
            if kind == "trickle":  # a 200 JSON answer, one byte a second: every read is quick, the whole is not
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                for byte in b'{"data": {"viewer": {"id": "' + b"x" * 100:
                    if stop.wait(1):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                return
            status, body, ctype = ((500, b"Internal Server Error", "text/plain") if kind == "500" else
                                   (200, b"<html><body>Sign in to the proxy</body></html>", "text/html"))
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture(scope="module")
def servers():
    stop = threading.Event()
    running = {}
    for kind in ("500", "html", "silent", "trickle"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(kind, stop))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        running[kind] = server
    with socket.socket() as s:  # a port that was free a moment ago and that nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    urls = {kind: f"http://127.0.0.1:{srv.server_address[1]}" for kind, srv in running.items()}
    urls["closed"] = f"http://127.0.0.1:{closed}"
    yield urls
    stop.set()
    for server in running.values():
        server.shutdown()
        server.server_close()


@pytest.mark.slow  # real processes against a real or a broken W&B server
@pytest.mark.parametrize("kind", ["closed", "500", "html", "silent", "trickle"])
def test_a_broken_wandb_server_sends_the_run_offline_and_a_rerun_works(tmp_path, tiny, servers, kind):
    run = tmp_path / "run"
    env = {"WANDB_MODE": None, "WANDB_API_KEY": SECRET, "WANDB_BASE_URL": servers[kind]}
    budgets = (4, 8) if kind == "silent" else (4,)  # a rerun continues the dir and its W&B run id
    for budget in budgets:
        proc = run_cli([*tiny, "logger=wandb", f"logger.init_timeout={TIMEOUT}", f"trainer.max_steps={budget}",
                        f"hydra.run.dir={run}"], env=env, real_process=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Traceback" not in proc.stdout + proc.stderr
        [line] = [line for line in proc.stdout.splitlines() if "W&B unreachable" in line]
        waited = float(re.search(r"after ([0-9.]+) s", line).group(1))
        assert waited <= TIMEOUT + 0.5, line
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["step"] == budget
    assert len(list((run / "wandb").glob("offline-run-*"))) == len(budgets)
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow  # a real process: what the user sees (in this one, the loopback servers' threads print too)
def test_a_bad_value_with_wandb_unreachable_is_one_line_and_still_recorded(tmp_path, tiny, servers):
    """The config error is the news: W&B's own fallback line is not printed beside it (it once was, a second line),
    and the failed run is still recorded in an offline W&B run."""
    run = tmp_path / "run"
    env = {"WANDB_MODE": None, "WANDB_API_KEY": SECRET, "WANDB_BASE_URL": servers["closed"]}
    proc = run_cli([*tiny, "logger=wandb", f"logger.init_timeout={TIMEOUT}", "model.latent_dim=0",
                    f"hydra.run.dir={run}"], env=env, real_process=True)
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "model.latent_dim" in lines[0], lines
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    assert next(r["exit"]["exit_code"] for r in leet(run / "wandb") if r["type"] == "exit") == 1
    assert "model.latent_dim" in json.dumps(leet(run / "wandb", summary=True))


@pytest.mark.slow  # real processes against a real or a broken W&B server
def test_an_empty_wandb_mode_is_unset_not_a_crash(tmp_path, tiny):
    """WANDB_MODE="" (as env files and CI templates leave it) means unset: the run trains, offline without a key."""
    run = tmp_path / "run"
    proc = run_cli([*tiny, "logger=wandb", "trainer.max_steps=2", f"hydra.run.dir={run}"],
                   env={"WANDB_MODE": "", "WANDB_API_KEY": None}, real_process=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-2000:]
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert list((run / "wandb").glob("offline-run-*"))


def test_wandb_failing_after_its_start_turns_wandb_off_and_never_the_run(tmp_path, caplog, monkeypatch):
    """After a good start W&B can still fail (its service gone, the run ended under us): here the real error W&B
    raises when its run has ended. Every later call (a metrics row, images, the final summary) goes on without
    W&B after one warning, and metrics.jsonl keeps every step."""
    from src.config import LoggerConfig
    from src.loggers import RunLogger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = RunLogger(tmp_path, LoggerConfig(mode="offline"), {"loss": {"beta": 1.0}})
    assert logger.wandb is not None
    logger.wandb.finish()  # W&B's run is over while the trainer goes on
    image = tmp_path / "grid.png"
    from PIL import Image
    Image.new("RGB", (4, 4)).save(image)
    with caplog.at_level("WARNING", logger="src.loggers"):
        logger.log({"train/loss": 1.5}, step=1)
        logger.log_images({"samples": image}, step=1)
        logger.log({"train/loss": 1.25}, step=2)
        logger.finish({"status": "finished"})
    warnings = [r.getMessage() for r in caplog.records if "W&B failed" in r.getMessage()]
    assert len(warnings) == 1 and "UsageError" in warnings[0], warnings
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


@pytest.mark.slow  # real processes against a real or a broken W&B server
def test_a_copied_run_dir_gets_a_wandb_run_of_its_own(tmp_path, tiny):
    """A rerun into the same dir continues its W&B run; a copy of the dir, continued, starts another run instead of
    writing over the original's."""
    import shutil

    first, copy = tmp_path / "first", tmp_path / "copy"
    args = [*tiny, "logger=wandb", "logger.mode=offline", "trainer.max_steps=2"]
    assert run_cli([*args, f"hydra.run.dir={first}"]).returncode == 0
    original = (first / "wandb_run_id").read_text().split()[0]
    shutil.copytree(first, copy)
    assert run_cli([*args, "trainer.max_steps=4", f"hydra.run.dir={first}"]).returncode == 0  # continued in place
    assert (first / "wandb_run_id").read_text().split()[0] == original
    assert run_cli([*args, "trainer.max_steps=4", f"hydra.run.dir={copy}"]).returncode == 0
    assert (copy / "wandb_run_id").read_text().split()[0] != original


@pytest.mark.parametrize("status", ["requeued", "interrupted", "finished"])
def test_a_requeued_or_stopped_run_is_marked_on_wandb_not_just_failed(tmp_path, monkeypatch, status):
    """A SLURM member waiting for its requeue: its W&B run says preempting (W&B's own state for it), and its summary
    says requeued; a run stopped on purpose (W&B has no state for it) carries the tag `interrupted`; a finished run
    is neither."""
    from src.config import LoggerConfig
    from src.loggers import RunLogger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = RunLogger(tmp_path, LoggerConfig(mode="offline"), {"loss": {"beta": 1.0}})
    logger.log({"train/loss": 1.5}, step=1)
    logger.finish({"status": status, "step": 1})
    records = leet(tmp_path / "wandb")
    assert any(r["type"] == "preempting" for r in records) == (status == "requeued")
    shown = leet(tmp_path / "wandb", summary=True)
    assert {"status": status, "step": 1}.items() <= shown["summary"].items()
    assert ("interrupted" in shown["tags"]) == (status == "interrupted") and "beta=1" in shown["tags"]


@pytest.mark.slow  # real processes against a real or a broken W&B server
def test_a_pack_waits_for_a_silent_wandb_server_once_not_once_per_member(tmp_path, tiny, servers):
    """The members of a pack start one after another in one process: the first waits logger.init_timeout for the
    silent server and goes offline, the others go offline at once for the same reason (they used to wait in turn:
    16 members, 8 minutes before the first step)."""
    sweep = tmp_path / "sweep"
    env = {"WANDB_MODE": None, "WANDB_API_KEY": SECRET, "WANDB_BASE_URL": servers["silent"]}
    proc = run_cli(["-m", "hydra/launcher=packed", "hydra.launcher.engine=loop", *tiny, "trainer.max_steps=2",
                    "loss.beta=1,2,4", "logger=wandb", f"logger.init_timeout={TIMEOUT}", f"hydra.sweep.dir={sweep}"],
                   env=env)  # the driver here; the pack is its own process, with this environment
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    waited = []
    for member in range(3):
        rd = sweep / str(member)
        [line] = [line for line in (rd / "train.log").read_text().splitlines() if "W&B unreachable" in line]
        waited.append(float(re.search(r"after ([0-9.]+) s", line).group(1)))
        assert "gave no whole answer" in line, line
        assert json.loads((rd / "summary.json").read_text())["status"] == "finished"
        assert len(list((rd / "wandb").glob("offline-run-*"))) == 1
    assert TIMEOUT - 0.5 <= waited[0] <= TIMEOUT + 0.5 and max(waited[1:]) < 1.0, waited
