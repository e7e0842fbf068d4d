"""An unreachable or unresolvable MASTER_ADDR is one clear line and a non-zero exit within the rendezvous timeout
(RECYCLEGPT_RENDEZVOUS_TIMEOUT), not torch's 30-minute default (issue 10, bug 2b)."""
import datetime
import time
from pathlib import Path

import pytest

from parallel.setup import RENDEZVOUS_TIMEOUT_ENV, RendezvousError, free_port, rendezvous_store
from tests.helpers import QUIET, SMALL, clean_env, cli

LONG = datetime.timedelta(minutes=30)


def test_unresolvable_master_fails_at_once(monkeypatch):
    monkeypatch.setenv(RENDEZVOUS_TIMEOUT_ENV, "600")
    start = time.monotonic()
    with pytest.raises(RendezvousError, match=r"MASTER_ADDR=no-such-node\.invalid does not resolve .*NodeAddr"):
        rendezvous_store("no-such-node.invalid", free_port(), 1, 2, LONG)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("rank", [1, 0])
def test_unreachable_master_fails_within_the_timeout(monkeypatch, rank):
    """rank 1: nobody listens at MASTER_ADDR:PORT (the master never came up, or the address is another host's).
    rank 0: its own server is up but MASTER_ADDR leads elsewhere (a TEST-NET-1 address that routes nowhere)."""
    monkeypatch.setenv(RENDEZVOUS_TIMEOUT_ENV, "3")
    addr = "127.0.0.1" if rank == 1 else "192.0.2.1"
    start = time.monotonic()
    with pytest.raises(RendezvousError, match=rf"rank {rank}: could not reach the rendezvous MASTER_ADDR={addr} "
                                              r"MASTER_PORT=\d+ within 3 s"):
        rendezvous_store(addr, free_port(), rank, 2, LONG)
    assert time.monotonic() - start < 60


def test_store_waits_long_once_connected():
    store = rendezvous_store("127.0.0.1", free_port(), 0, 1, LONG)
    assert store.timeout == LONG


@pytest.mark.slow
def test_trainer_gives_one_line_and_exit_1(tmp_path):
    """The real entry point as the second rank of a job whose master is unreachable."""
    prefix = tmp_path / "data"
    for ext in (".bin", ".idx"):
        Path(f"{prefix}{ext}").write_bytes(b"")
    env = clean_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                    **{RENDEZVOUS_TIMEOUT_ENV: "5"})
    start = time.monotonic()
    proc = cli("-m", "pretrain.train", "--config", "configs/tiny.yaml", *SMALL, *QUIET, f"data.prefixes=[{prefix}]",
               f"run.dir={tmp_path / 'run'}", check=False, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "could not reach the rendezvous MASTER_ADDR=127.0.0.1" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 240   # start-up (imports) included; the wait itself is 5 s
