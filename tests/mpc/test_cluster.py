"""Parties as real OS processes over TCP: same tokens as plain; a peer that is missing, dies,
stalls or sends garbage ends the others with a clear error within the timeout; bad cluster
descriptions are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import veil
from conftest import port_taken_on_first_pick
from veil.errors import ConfigError, ProtocolAbort
from veil.mpc.cluster import (Cluster, _party_command, describe_exit, free_ports,
                              generate_local, local_cluster, log_tail, run_local, wait_parties)
from veil.mpc.config import MpcConfig
from veil.mpc.spu_runtime import unpack_share

PROMPT = [3, 17, 99, 5, 42, 7]


@pytest.mark.parametrize("raw, match", [
    ({"protocol": "gmw", "parties": ["a:1", "b:2"]}, "protocol"),
    ({"parties": ["a:1"]}, "exactly 2 party addresses"),
    ({"protocol": "aby3", "parties": ["a:1", "b:2"]}, "exactly 3"),
    ({"parties": ["a:1", "nope"]}, "host:port"),
    ({"parties": ["a:1", "a:1"]}, "share an address"),
    ({"parties": ["a:1", "b:2"], "colour": 1}, "unknown keys"),
    ({"parties": ["a:1", "b:2"], "timeout_s": 0}, "timeout_s"),
    ([1, 2], "JSON object"),
])
def test_bad_cluster_descriptions(raw, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        Cluster.from_dict(raw)
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        Cluster.load(path)
    with pytest.raises(ConfigError, match="cannot read"):
        Cluster.load(tmp_path / "missing.json")


def test_garbage_share_is_refused():
    with pytest.raises(ProtocolAbort, match="malformed share"):
        unpack_share(b"\x05\x00\x00\x00garbage", "p:embed.weight")


@pytest.mark.mpc
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_parties_over_tcp_match_plain(preset):
    """Each family, parties as OS processes over TCP: plain's 8 greedy tokens (the logits'
    fixed-point tolerance is checked on the same step programs in test_spu_sim.py)."""
    plain = veil.load(preset).generate(PROMPT, max_new_tokens=8, ignore_eos=True).token_ids
    seen = []
    tokens, step_s = generate_local(preset, PROMPT, 8, MpcConfig(), timeout_s=20,
                                    on_token=seen.append)
    assert tokens == plain == seen and len(step_s) == 8 and all(t > 0 for t in step_s)


@pytest.mark.mpc
def test_a_party_that_fails_to_start_is_named_and_not_restarted(tmp_path):
    picks = []

    def pick(n):
        picks.append(n)
        return free_ports(n)
    t0 = time.monotonic()
    with pytest.raises(ProtocolAbort) as info:
        generate_local("no-such-model", PROMPT, 2, MpcConfig(), timeout_s=10, pick_ports=pick,
                       workdir=tmp_path)
    assert time.monotonic() - t0 < 60
    assert "exited with exit status 2" in str(info.value)
    assert "no-such-model" in str(info.value) and "MPC party" in str(info.value)
    assert picks == [2]                       # not a taken port: no second start


# ---- the launcher's supervision, with stand-in parties (no SPU) ----------------------------

def _stand_ins(scripts: list[str]):
    """`commands` for run_local: party r runs `scripts[r]` ({address} filled in)."""
    def commands(addresses):
        return [[sys.executable, "-c", scripts[r].format(address=a)]
                for r, a in enumerate(addresses)]
    return commands


def _until_done(parties):
    wait_parties(parties, time.monotonic() + 30, "stand-in parties")
    return "ok"


_NOISY = ("print('[2026-12-03 10:00:00.000] [info] [api.cc:1] spu noise');"
          "print('loading the weights', flush=True);")


def test_exit_status_and_log_tail_are_reported(tmp_path):
    picks = []

    def pick(n):
        picks.append(n)
        return free_ports(n)
    commands = _stand_ins([_NOISY + "import sys; sys.exit(3)", "import time; time.sleep(60)"])
    t0 = time.monotonic()
    with pytest.raises(ProtocolAbort) as info:
        run_local(tmp_path, 2, commands, _until_done, pick)
    msg = str(info.value)
    assert "MPC party 0 (owner) exited with exit status 3" in msg and "loading the weights" in msg
    assert "spu noise" not in msg                  # SPU's own log lines are left out
    assert picks == [2] and time.monotonic() - t0 < 20     # the peer was not waited for


def test_a_killed_party_is_reported_as_the_kernels_doing(tmp_path):
    commands = _stand_ins(["import time; time.sleep(60)",
                                  _NOISY + "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    with pytest.raises(ProtocolAbort) as info:
        run_local(tmp_path, 2, commands, _until_done)
    msg = str(info.value)
    assert "MPC party 1 (client) was killed by the kernel, likely out of memory" in msg
    assert "loading the weights" in msg
    assert not list(tmp_path.glob("party*.tmp"))   # every party's scratch is removed


def test_describe_exit_and_log_tail(tmp_path):
    assert describe_exit(0) == "exited with exit status 0"
    assert describe_exit(3) == "exited with exit status 3"
    assert describe_exit(-signal.SIGKILL) == ("was killed by the kernel, likely out of memory "
                                              "(SIGKILL)")
    assert describe_exit(-signal.SIGSEGV) == "was killed by SIGSEGV"
    log = tmp_path / "p.log"
    log.write_text("".join(f"line {i}\n[2026-01-01 00:00:00] [info] x\n\n" for i in range(9)))
    assert log_tail(log, 3) == ["line 6", "line 7", "line 8"]
    assert log_tail(tmp_path / "missing.log") == []


def test_a_taken_port_restarts_every_party_a_bounded_number_of_times(tmp_path):
    """Stand-ins that fail as a party whose port is taken does: every start is retried on fresh
    ports, three starts in all, and then the failure is reported as such."""
    picks = []

    def pick(n):
        picks.append(n)
        return free_ports(n)
    bind_fails = "print('E1203 server.cpp:1088] Fail to listen {address}'); raise SystemExit(2)"
    commands = _stand_ins([bind_fails, "import time; time.sleep(60)"])
    with pytest.raises(ProtocolAbort, match="taken on each of 3 starts"):
        run_local(tmp_path, 2, commands, _until_done, pick)
    assert picks == [2, 2, 2]


# ---- real parties ----------------------------------------------------------------------------

def _child_pid(*args: str) -> int:
    """The pid of this process's child whose command line holds `args` in a row (Linux /proc)."""
    want = "\0".join(args).encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and want in cmdline:
            return int(d.name)
    raise AssertionError(f"no child process with {args}")


@pytest.mark.mpc
def test_a_party_killed_mid_run_is_named_with_its_log(tmp_path):
    """The owner SIGKILLed after the first token (what the kernel's OOM killer does): the
    error names it, says what killed it, and shows its last log lines."""
    killed: list[int] = []

    def kill_owner(token):
        if not killed:
            os.kill(_child_pid("--rank", "0"), signal.SIGKILL)
            killed.append(token)
    with pytest.raises(ProtocolAbort) as info:
        generate_local("tiny-llama", PROMPT, 6, MpcConfig(), timeout_s=20, on_token=kill_owner,
                       workdir=tmp_path)
    msg = str(info.value)
    assert killed and "MPC party 0 (owner) was killed by the kernel, likely out of memory" in msg
    assert "linking owner" in msg                  # the tail of the owner's log
    assert not list(tmp_path.glob("party*.tmp"))


@pytest.mark.mpc
def test_a_port_taken_before_the_party_binds_it_is_retried():
    """Another process listens on the owner's port between picking and binding: the owner
    cannot bind (brpc: "Fail to listen …"), and the whole start is repeated on fresh ports."""
    with port_taken_on_first_pick(0) as (pick, picks):
        plain = veil.load("tiny-llama").generate(PROMPT, max_new_tokens=3,
                                                 ignore_eos=True).token_ids
        tokens, _ = generate_local("tiny-llama", PROMPT, 3, MpcConfig(), timeout_s=20,
                                   pick_ports=pick)
    assert tokens == plain and picks == [2, 2]


_FAKE_OWNER = textwrap.dedent("""
    import sys, time, spu.api as spu_api, spu.libspu as libspu
    from veil.mpc.cluster import Cluster
    c = Cluster.load(sys.argv[1]); mode = sys.argv[2]
    lctx = libspu.link.create_brpc(c.link_desc(), 0)
    rt = spu_api.Runtime(lctx, c.mpc.runtime_config())   # as a real party does
    lctx.recv(1)                              # the client's request
    if mode == "garbage":
        lctx.send(1, b"\\x07\\x00garbage")   # not a share
    elif mode == "die":
        import os; os._exit(9)
    time.sleep(600)                           # stall
""")


@pytest.mark.mpc
@pytest.mark.parametrize("mode, match", [("garbage", "malformed share"),
                                         ("stall", "protocol failed|timeout"),
                                         ("die", "protocol failed|timeout|exited")])
def test_client_ends_cleanly_when_the_owner_misbehaves(mode, match, tmp_path):
    cluster = local_cluster(MpcConfig(), timeout_s=5)
    cfile = tmp_path / "cluster.json"
    cfile.write_text(json.dumps(cluster.to_dict()))
    owner = subprocess.Popen([sys.executable, "-c", _FAKE_OWNER, str(cfile), mode],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        client = subprocess.run(_party_command(cfile, 1, "tiny-llama", 2, PROMPT),
                                capture_output=True, text=True, timeout=90)
    finally:
        owner.kill()
        owner.wait()
    elapsed = time.monotonic() - t0
    assert client.returncode != 0
    if client.returncode == 2:                # our one-line error (else SPU ended the process)
        assert "ProtocolAbort" in client.stderr and len(client.stderr.strip().splitlines()) >= 1
        assert __import__("re").search(match, client.stderr), client.stderr[-500:]
    assert elapsed < 60, elapsed


@pytest.mark.mpc
def test_parties_with_different_settings_are_refused(tmp_path):
    """An owner given another weight_cache setting than the client's would desynchronise SEMI2K
    (one side replays a cached mask, the other opens a fresh one): the digest in the client's
    request stops it before anything secret moves."""
    cluster = local_cluster(MpcConfig(), timeout_s=5)
    files = []
    for rank, cache in ((0, False), (1, True)):
        f = tmp_path / f"cluster{rank}.json"
        f.write_text(json.dumps({**cluster.to_dict(), "weight_cache": cache}))
        files.append(f)
    owner = subprocess.Popen(_party_command(files[0], 0, "tiny-llama", 2, None),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = subprocess.run(_party_command(files[1], 1, "tiny-llama", 2, PROMPT),
                                capture_output=True, text=True, timeout=90)
        _, owner_err = owner.communicate(timeout=90)
    finally:
        owner.kill()
        owner.wait()
    assert owner.returncode == 2 and "disagree on the protocol settings" in owner_err, owner_err[-500:]
    assert client.returncode != 0
