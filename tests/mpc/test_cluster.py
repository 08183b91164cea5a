"""Parties as real OS processes over TCP: same tokens as plain; a peer that is missing, dies,
stalls or sends garbage ends the others with a clear error within the timeout; bad cluster
descriptions are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

import veil
from veil.errors import ConfigError, ProtocolAbort
from veil.mpc.cluster import Cluster, _party_command, generate_local, local_cluster
from veil.mpc.spu_runtime import MpcConfig, unpack_share

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


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_parties_over_tcp_match_plain(preset):
    """Each family, parties as OS processes over TCP: plain's 8 greedy tokens (the logits'
    fixed-point tolerance is checked on the same step programs in test_spu_sim.py)."""
    plain = veil.load(preset).generate(PROMPT, max_new_tokens=8, ignore_eos=True).token_ids
    seen = []
    tokens, step_s = generate_local(preset, PROMPT, 8, MpcConfig(), timeout_s=20,
                                    on_token=seen.append)
    assert tokens == plain == seen and len(step_s) == 8 and all(t > 0 for t in step_s)


def test_a_party_that_fails_to_start_is_named():
    t0 = time.monotonic()
    with pytest.raises(ProtocolAbort, match="MPC party \\d \\(\\w+\\) exited .*no-such-model"):
        generate_local("no-such-model", PROMPT, 2, MpcConfig(), timeout_s=10)
    assert time.monotonic() - t0 < 60


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
