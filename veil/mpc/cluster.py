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
child process and supervised (`PartyProcess`, `run_local`; the bench's launcher uses the same):
the launcher enforces a wall-clock limit and turns a party that exits non-zero, is killed, or
stalls into `ProtocolAbort` naming the party, how it ended (its exit status, or the signal —
SIGKILL being, in practice, the kernel's out-of-memory killer) and the last lines of its log —
never a hang, never an empty message.

Ports. SPU's link needs every party's address before any party starts, so a local launcher picks
free ports first and the parties bind them later; another process can take one in between. A
party that cannot bind its address fails at once (brpc logs "Fail to listen <address>"), and the
launcher starts every party again on fresh ports, a bounded number of times.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from veil.errors import ConfigError, ProtocolAbort
from veil.model.generate import check_prompts
from veil.model.opening import open_model, open_public
from veil.mpc.config import CLIENT, MPC_KEYS, OWNER, MpcConfig

ROLES = {0: "owner", 1: "client", 2: "helper"}


def read_json(path: Path, what: str) -> Any:
    """A JSON file a process was handed (`what` names it in the error)."""
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path} ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None


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
        return Cluster.from_dict(read_json(Path(path), "the cluster description"), str(path))

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
    return Cluster(mc, loopback(free_ports(mc.world)), timeout_s)


def loopback(ports: list[int]) -> tuple[str, ...]:
    return tuple(f"127.0.0.1:{p}" for p in ports)


# ---- party processes on this host: start, supervise, report, start again on a taken port -----

def describe_exit(returncode: int) -> str:
    """How a child process ended, as a phrase: "exited with exit status 3", "was killed by the
    kernel, likely out of memory (SIGKILL)", "was killed by SIGSEGV"."""
    if returncode >= 0:
        return f"exited with exit status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if -returncode == signal.SIGKILL:
        # nothing in veil sends a party SIGKILL while it runs; the kernel's OOM killer does,
        # and leaves nothing in the party's own output
        return "was killed by the kernel, likely out of memory (SIGKILL)"
    return f"was killed by {name}"


def log_tail(path: Path, lines: int = 6) -> list[str]:
    """The last non-blank lines of a party's log, leaving out SPU's own timestamped lines
    ("[2026-…] [info] …"), which bury the party's error (each line cut to 300 characters)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    kept = [ln.rstrip()[-300:] for ln in text.splitlines()
            if ln.strip() and not ln.startswith("[20")]
    return kept[-lines:]


class PartyProcess:
    """One party as a child process on this host. Its stdout (unless `pipe_stdout`) and stderr
    go to `folder`/party<rank>.log; its temporary files — SPU's Beaver cache, which holds the
    opened masked weights — to `folder`/party<rank>.tmp, removed by `stop` whatever the party
    left there."""

    def __init__(self, rank: int, address: str, cmd: list[str], folder: Path,
                 pipe_stdout: bool = False) -> None:
        self.rank, self.address = rank, address
        self.log = folder / f"party{rank}.log"
        self.scratch = folder / f"party{rank}.tmp"
        self.scratch.mkdir(exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(self.scratch))
        with open(self.log, "w") as log:           # the child holds its own descriptor
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if pipe_stdout else log,
                                         stderr=log, env=env)

    @property
    def name(self) -> str:
        return f"MPC party {self.rank} ({ROLES[self.rank]})"

    def failed(self) -> bool:
        return self.proc.poll() not in (None, 0)

    def port_taken(self) -> bool:
        """Whether the party could not bind its own address. brpc logs "Fail to listen
        127.0.0.1:61530" (on stderr, or in SPU's log file where the party set one up, as the
        bench's do) and yacl's link then raises "brpc server failed start" — on a loopback
        address picked free a moment earlier, in practice because the port was taken since."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return False
        return f"Fail to listen {self.address}" in text or "brpc server failed start" in text

    def describe(self) -> str:
        """How the party ended and the last lines of its log."""
        tail = log_tail(self.log)
        shown = "".join(f"\n    {ln}" for ln in tail) if tail else " (nothing)"
        return (f"{self.name} {describe_exit(self.proc.returncode)}; its log ({self.log}) "
                f"ends:{shown}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


class PartyFailure(ProtocolAbort):
    """Parties that ended badly, each described; `port_taken` when one of them could not bind
    its address."""

    def __init__(self, failed: list[PartyProcess]) -> None:
        self.port_taken = any(p.port_taken() for p in failed)
        super().__init__("\n".join(p.describe() for p in failed))


def check_parties(parties: list[PartyProcess]) -> None:
    """Raises `PartyFailure` if a party has ended badly."""
    failed = [p for p in parties if p.failed()]
    if failed:
        raise PartyFailure(failed)


def wait_parties(parties: list[PartyProcess], deadline: float, what: str) -> None:
    """Until every party has exited 0: `PartyFailure` as soon as one ends badly (its peers may
    wait out their link timeout first), `ProtocolAbort` at `deadline` (time.monotonic)."""
    while any(p.proc.poll() is None for p in parties):
        check_parties(parties)
        if time.monotonic() > deadline:
            running = ", ".join(p.name for p in parties if p.proc.poll() is None)
            raise ProtocolAbort(f"{what} did not finish in time ({running} still running)")
        time.sleep(0.05)
    check_parties(parties)


T = TypeVar("T")


def run_local(folder: Path, world: int, commands: Callable[[tuple[str, ...]], list[list[str]]],
              supervise: Callable[[list[PartyProcess]], T],
              pick_ports: Callable[[int], list[int]] = free_ports, attempts: int = 3,
              pipe_stdout: int | None = None) -> T:
    """Start `world` parties (`PartyProcess`es in `folder`) on loopback ports from `pick_ports`,
    rank r running `commands(addresses)[r]` (rank `pipe_stdout` with its stdout piped to us), and
    `supervise` them to a result; every party is stopped afterwards, however it ended. A party
    that could not bind its port (taken after it was picked: see the module docstring) makes
    every party start again on fresh ports, up to `attempts` starts in all; any other failure
    is raised at once."""
    attempt = 1
    while True:
        addresses = loopback(pick_ports(world))
        parties: list[PartyProcess] = []
        try:
            for rank, cmd in enumerate(commands(addresses)):
                parties.append(PartyProcess(rank, addresses[rank], cmd, folder,
                                            pipe_stdout=rank == pipe_stdout))
            return supervise(parties)
        except PartyFailure as exc:
            if not exc.port_taken:
                raise
            if attempt == attempts:
                raise ProtocolAbort(f"{exc}\n(a party's port was taken on each of {attempts} "
                                    "starts with fresh ports)") from None
        finally:
            for p in parties:
                p.stop()
        attempt += 1


# ---- one party's process ---------------------------------------------------------------------

def run_party(cluster: Cluster, rank: int, model: str, max_new_tokens: int,
              prompt: list[int] | None, emit: Callable[[str], None]) -> None:
    """Body of `veil mpc party`: link up, run the generation, report. The client emits
    `token <id>` per generated token; every party ends with `done`."""
    import spu.libspu as libspu     # SPU and jax load only in a party process

    from veil.mpc.program import param_shapes, params_of
    from veil.mpc.spu_runtime import party, scratch_dir, spu_error

    if not 0 <= rank < cluster.mpc.world:
        raise ConfigError(f"rank {rank} is not in the cluster (ranks 0..{cluster.mpc.world - 1})")
    if (prompt is not None) != (rank == CLIENT):
        raise ConfigError("the prompt goes to the client (rank 1), and only to it")
    if rank == OWNER:
        opened = open_model(model)
        cfg, params = opened.cfg, params_of(opened.cfg, opened.weights)
    else:
        cfg, params = open_public(model)[0], None
    if prompt is not None:
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
                   on_token: Callable[[int], None] | None = None, workdir: Path | None = None,
                   pick_ports: Callable[[int], list[int]] = free_ports
                   ) -> tuple[list[int], list[float]]:
    """Start every party as its own process on loopback; the client's tokens and the wall time
    of each step as the client measured it. `wall_s` bounds the whole run (default: generous,
    from the timeout and the token count); `pick_ports` chooses the ports (`run_local`)."""
    import tempfile

    folder = Path(workdir or tempfile.mkdtemp(prefix="veil-mpc-"))
    budget = wall_s or 120 + timeout_s * (4 + max_new_tokens)
    deadline = time.monotonic() + budget

    def commands(addresses: tuple[str, ...]) -> list[list[str]]:
        cfile = folder / "cluster.json"
        cfile.write_text(json.dumps(Cluster(mc, addresses, timeout_s).to_dict()))
        return [_party_command(cfile, rank, model, max_new_tokens,
                               prompt if rank == CLIENT else None) for rank in range(mc.world)]

    def supervise(parties: list[PartyProcess]) -> tuple[list[int], list[float]]:
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

        client = parties[CLIENT].proc
        assert client.stdout is not None
        fd = client.stdout.fileno()
        os.set_blocking(fd, False)
        while True:
            check_parties(parties)
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
        wait_parties(parties, max(time.monotonic() + 1.0, deadline), "MPC generation")
        return tokens, step_s

    keep = False    # the logs stay only for a run that failed: its ProtocolAbort names them
    try:
        tokens, step_s = run_local(folder, mc.world, commands, supervise, pick_ports,
                                   pipe_stdout=CLIENT)
        if len(tokens) != max_new_tokens:
            raise ProtocolAbort(f"the client reported {len(tokens)} of {max_new_tokens} tokens")
    except ProtocolAbort:
        keep = True
        raise
    finally:
        # success, or interrupted from outside (the caller's exception, Ctrl-C): nothing kept
        if workdir is None and not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return tokens, step_s
