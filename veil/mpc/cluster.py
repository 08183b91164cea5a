"""Parties as OS processes linked over TCP: the cluster description, one party's process, and a
local launcher that starts every party on loopback.

A cluster description (JSON) names the protocol, the fixed-point settings, a timeout, and one
address per party in rank order — rank 0 the model owner, rank 1 the client, rank 2 ABY3's helper:

    {"protocol": "semi2k", "field": "fm64", "fxp_bits": 18, "timeout_s": 60,
     "parties": ["10.0.0.5:61530", "10.0.0.9:61531"]}

(optional: "exp_iters", "weight_cache", "reveal"; every party must be given the same settings — they
compare a digest of them before anything secret moves.)

Nothing assumes loopback: each host runs `veil mpc party --cluster C.json --rank R ...`.

Failure handling. SPU's link raises on a receive timeout, but a peer that dies can also make it
end the whole process from a native thread (no Python exception), so a party is always run as a
child process and supervised: the launcher reads the client's tokens from its stdout, enforces a
wall-clock limit, and turns a party that exits non-zero, is killed, or stalls into
`ProtocolAbort` naming the party and the last line it printed — never a hang.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from veil.errors import ConfigError, ProtocolAbort
from veil.mpc.spu_runtime import CLIENT, MPC_KEYS, OWNER, MpcConfig

ROLES = {0: "owner", 1: "client", 2: "helper"}


@dataclass(frozen=True)
class Cluster:
    mpc: MpcConfig
    parties: tuple[str, ...]        # "host:port" per rank
    timeout_s: float = 60.0

    @staticmethod
    def from_dict(raw: Any, where: str = "cluster description") -> "Cluster":
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        known = {*MPC_KEYS, "timeout_s", "parties"}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        try:
            mc = MpcConfig(**{k: raw[k] for k in MPC_KEYS if k in raw})
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        parties = raw.get("parties")
        if not isinstance(parties, list) or len(parties) != mc.world:
            raise ConfigError(f"{where}: {mc.protocol} needs exactly {mc.world} party addresses "
                              f"(rank 0 owner, 1 client{', 2 helper' if mc.world == 3 else ''}), "
                              f"got {parties!r}")
        for p in parties:
            host, sep, port = str(p).rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"{where}: party address {p!r} is not host:port")
        if len(set(parties)) != len(parties):
            raise ConfigError(f"{where}: two parties share an address")
        timeout = raw.get("timeout_s", 60.0)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"{where}: timeout_s must be a positive number, got {timeout!r}")
        return Cluster(mc, tuple(str(p) for p in parties), float(timeout))

    @staticmethod
    def load(path: str | Path) -> "Cluster":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read the cluster description {path} ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not JSON ({exc})") from None
        return Cluster.from_dict(raw, str(path))

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.mpc.protocol, "field": self.mpc.field, "fxp_bits": self.mpc.fxp_bits,
                "exp_iters": self.mpc.exp_iters, "weight_cache": self.mpc.weight_cache,
                "reveal": self.mpc.reveal, "timeout_s": self.timeout_s,
                "parties": list(self.parties)}

    def link_desc(self) -> Any:
        """SPU's link description with bounded retries and timeouts (the defaults can block
        for minutes on a dead peer)."""
        import spu.libspu as libspu

        d = libspu.link.Desc()
        d.id = "veil-mpc"
        for rank, addr in enumerate(self.parties):
            d.add_party(f"party{rank}", addr)
        ms = int(self.timeout_s * 1000)
        d.recv_timeout_ms = ms
        d.http_timeout_ms = ms
        d.connect_retry_interval_ms = 200
        d.connect_retry_times = max(1, int(self.timeout_s / 0.2))
        ro = d.retry_opts
        ro.max_retry = 1
        ro.retry_interval_ms = 100
        d.retry_opts = ro
        return d


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def local_cluster(mc: MpcConfig, timeout_s: float = 60.0) -> Cluster:
    return Cluster(mc, tuple(f"127.0.0.1:{p}" for p in free_ports(mc.world)), timeout_s)


# ---- one party's process ---------------------------------------------------------------------

def run_party(cluster: Cluster, rank: int, model: str, max_new_tokens: int,
              prompt: list[int] | None, emit: Callable[[str], None]) -> None:
    """Body of `veil mpc party`: link up, run the generation, report. The client emits
    `token <id>` per generated token; every party ends with `done`."""
    import spu.libspu as libspu

    from veil.mpc.program import param_shapes, params_of
    from veil.mpc.spu_runtime import party, scratch_dir, spu_error

    if not 0 <= rank < cluster.mpc.world:
        raise ConfigError(f"rank {rank} is not in the cluster (ranks 0..{cluster.mpc.world - 1})")
    if (prompt is not None) != (rank == CLIENT):
        raise ConfigError("the prompt goes to the client (rank 1), and only to it")
    from veil.model.opening import open_model, open_public

    if rank == OWNER:
        opened = open_model(model)
        cfg, params = opened.cfg, params_of(opened.cfg, opened.weights)
    else:
        cfg, params = open_public(model)[0], None
    if prompt is not None:
        from veil.model.generate import check_prompts

        check_prompts(cfg, [prompt])
    shapes = param_shapes(cfg)
    emit(f"linking {ROLES[rank]}")
    try:
        lctx = libspu.link.create_brpc(cluster.link_desc(), rank)
    except RuntimeError as exc:
        raise ProtocolAbort(f"party {rank} could not link up with its peers: {spu_error(exc)}") from None
    with scratch_dir():
        party(rank, lctx, cfg, cluster.mpc, max_new_tokens, None, shapes, params, prompt,
              on_token=lambda t, sec: emit(f"token {t} {sec:.6f}"))
    lctx.stop_link()
    emit("done")


def _party_command(cluster_file: Path, rank: int, model: str, n: int, prompt: list[int] | None) -> list[str]:
    cmd = [sys.executable, "-m", "veil.cli", "mpc", "party", "--cluster", str(cluster_file),
           "--rank", str(rank), "--model", model, "--max-new-tokens", str(n)]
    if prompt is not None:
        cmd += ["--prompt-ids", ",".join(map(str, prompt))]
    return cmd


def generate_local(model: str, prompt: list[int], max_new_tokens: int, mc: MpcConfig,
                   timeout_s: float = 60.0, wall_s: float | None = None,
                   on_token: Callable[[int], None] | None = None, workdir: Path | None = None
                   ) -> tuple[list[int], list[float]]:
    """Start every party as its own process on loopback; the client's tokens and the wall time
    of each step as the client measured it. `wall_s` bounds the whole run (default: generous,
    from the timeout and the token count)."""
    import tempfile

    cluster = local_cluster(mc, timeout_s)
    folder = Path(workdir or tempfile.mkdtemp(prefix="veil-mpc-"))
    cfile = folder / "cluster.json"
    cfile.write_text(json.dumps(cluster.to_dict()))
    # the parties' scratch (SPU's Beaver cache) goes under the folder, removed with it
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(folder))
    procs: list[subprocess.Popen] = []
    logs = []
    budget = wall_s or 120 + timeout_s * (4 + max_new_tokens)
    deadline = time.monotonic() + budget
    tokens: list[int] = []
    step_s: list[float] = []
    buf = ""

    def take(chunk: str) -> None:
        nonlocal buf
        buf += chunk
        while "\n" in buf:
            line, buf = buf.split("\n", 1)
            if line.startswith("token "):
                try:
                    _, tok, sec = line.split()
                    tokens.append(int(tok))
                    step_s.append(float(sec))
                except ValueError:
                    raise ProtocolAbort(f"malformed line from the client: {line[:100]!r}") from None
                if on_token is not None:
                    on_token(tokens[-1])

    try:
        for rank in range(mc.world):
            log = open(folder / f"party{rank}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(_party_command(cfile, rank, model, max_new_tokens,
                                                         prompt if rank == CLIENT else None),
                                          stdout=subprocess.PIPE if rank == CLIENT else log,
                                          stderr=log, env=env))
        client = procs[CLIENT]
        assert client.stdout is not None
        fd = client.stdout.fileno()
        os.set_blocking(fd, False)
        while True:
            for rank, p in enumerate(procs):
                code = p.poll()
                if code not in (None, 0):
                    raise ProtocolAbort(f"MPC party {rank} ({ROLES[rank]}) exited with code {code}: "
                                        f"{_last_line(folder / f'party{rank}.log')} (logs in {folder})")
            exited = client.poll() == 0
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                chunk = None
            if chunk:
                take(chunk.decode("utf-8", "replace"))
            elif exited and chunk == b"":      # end of the client's output, all of it read
                break
            if time.monotonic() > deadline:
                raise ProtocolAbort(f"MPC generation did not finish within {budget:.0f} s "
                                    f"({len(tokens)} tokens so far)")
            if not chunk:
                time.sleep(0.02)
        for rank, p in enumerate(procs):
            try:
                code = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise ProtocolAbort(f"MPC party {rank} ({ROLES[rank]}) did not end") from None
            if code != 0:
                raise ProtocolAbort(f"MPC party {rank} ({ROLES[rank]}) exited with code {code}: "
                                    f"{_last_line(folder / f'party{rank}.log')}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
        for scratch in folder.glob("veil-spu-*"):      # a killed party's, even if logs stay
            shutil.rmtree(scratch, ignore_errors=True)
    if len(tokens) != max_new_tokens:
        raise ProtocolAbort(f"the client reported {len(tokens)} of {max_new_tokens} tokens")
    if workdir is None:
        shutil.rmtree(folder, ignore_errors=True)      # logs are kept only when a run fails
    return tokens, step_s


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()
                 and not ln.startswith("[20")]        # SPU's own timestamped log lines
    except OSError:
        return "(no log)"
    return lines[-1][-300:] if lines else "(no output)"
