"""The CKKS engine: keys, encoding, and the ciphertext operations the HE executor is built from,
each counted and timed (the cost record's primitives).

Conventions, so that every addition meets operands of one scale:
  * every ciphertext sits at scale exactly Δ = 2^scale_bits at every level;
  * a plaintext multiplier is encoded at scale p_l (the prime the next rescale drops), so
    ct·pt then rescale lands back on Δ exactly;
  * a ct×ct product is Δ²/p_l after rescale and is relabelled Δ: a relative error |p_l − Δ|/Δ
    (< 2^-16 for these primes, measured per set in tests) per such product.
Levels count down: a fresh ciphertext is at `params.levels`, one at 0 can no longer multiply.

Rotations use only the Galois keys the client made for the steps the server's plan declared
(`create_galois_keys` takes Galois elements 3^k mod 2N, not steps); a step without its own key is
composed from the available ones, or refused.

Key generation is SEAL's: its keys and encryption noise come from SEAL's Blake2xb PRNG seeded
from the operating system's entropy — a CSPRNG, never a torch/numpy generator.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from tenseal import sealapi as seal

from veil.errors import ConfigError, ProtocolAbort
from veil.he.params import CkksParams

Ct = seal.Ciphertext


@dataclass
class Counters:
    """How many of each primitive ran, and the seconds they took."""

    count: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, kind: str, seconds: float, n: int = 1) -> None:
        self.count[kind] += n
        self.seconds[kind] += seconds

    def as_dict(self) -> dict:
        return {k: {"count": self.count[k], "s": round(self.seconds[k], 4)}
                for k in sorted(self.count)}


def galois_element(step: int, poly_degree: int) -> int:
    """SEAL's Galois element for a left rotation by `step` slots (negative: right)."""
    slots = poly_degree // 2
    if not 0 < abs(step) < slots:
        raise ConfigError(f"rotation step {step} out of range for {slots} slots")
    e = step if step > 0 else slots + step
    return pow(3, e, 2 * poly_degree)


class Engine:
    """One party's view of a CKKS instance. The client (`Engine.client`) holds the secret key;
    the server (`Engine.server`) has the public, relinearisation and Galois keys only."""

    symbolic = False       # real ciphertexts (plan.CountingEngine counts instead)

    def __init__(self, params: CkksParams, context: seal.SEALContext) -> None:
        self.params = params
        self.ctx = context
        self.encoder = seal.CKKSEncoder(context)
        self.evaluator = seal.Evaluator(context)
        self.scale = 2.0 ** params.scale_bits
        self.slots = params.slots
        self.counters = Counters()
        self.steps: set[int] = set()
        self.relin: seal.RelinKeys | None = None
        self.galois: seal.GaloisKeys | None = None
        self.encryptor: seal.Encryptor | None = None
        self.decryptor: seal.Decryptor | None = None
        self._tmp = tempfile.mkdtemp(prefix="veil-he-")       # 0700: serialisation scratch
        self._parms_at: dict[int, list[int]] = {}
        self._prime_at: dict[int, float] = {}
        data = context.first_context_data()
        while data is not None:
            level = data.chain_index()
            self._parms_at[level] = data.parms_id()
            self._prime_at[level] = float(data.parms().coeff_modulus()[-1].value())
            data = data.next_context_data()

    # ---- set-up ---------------------------------------------------------------------------
    @staticmethod
    def context(params: CkksParams) -> seal.SEALContext:
        params.check()
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(params.poly_degree)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_degree, list(params.bits)))
        level = seal.SEC_LEVEL_TYPE.TC128 if params.secure else seal.SEC_LEVEL_TYPE.NONE
        ctx = seal.SEALContext(parms, True, level)
        if not ctx.parameters_set():
            raise ConfigError(f"CKKS set {params.name}: SEAL refused it "
                              f"({ctx.parameters_error_message()})")
        return ctx

    @classmethod
    def client(cls, params: CkksParams, steps: Iterable[int]) -> "Engine":
        eng = cls(params, cls.context(params))
        keygen = seal.KeyGenerator(eng.ctx)
        eng._secret = keygen.secret_key()
        eng._public = seal.PublicKey()
        keygen.create_public_key(eng._public)
        eng.relin = seal.RelinKeys()
        keygen.create_relin_keys(eng.relin)
        eng.steps = {int(s) for s in steps}
        eng.galois = seal.GaloisKeys()
        if eng.steps:
            keygen.create_galois_keys(
                sorted({galois_element(s, params.poly_degree) for s in eng.steps}), eng.galois)
        eng.encryptor = seal.Encryptor(eng.ctx, eng._public)
        eng.decryptor = seal.Decryptor(eng.ctx, eng._secret)
        return eng

    def public_blobs(self) -> dict[str, bytes]:
        """What the server needs: the public, relinearisation and Galois keys."""
        return {"public": self._save(self._public), "relin": self._save(self.relin),
                "galois": self._save(self.galois) if self.steps else b""}

    @classmethod
    def server(cls, params: CkksParams, blobs: dict[str, bytes], steps: Iterable[int]) -> "Engine":
        eng = cls(params, cls.context(params))
        eng._public = eng._load(seal.PublicKey(), blobs["public"], "public key")
        eng.relin = eng._load(seal.RelinKeys(), blobs["relin"], "relinearisation keys")
        eng.steps = {int(s) for s in steps}
        eng.galois = seal.GaloisKeys()
        if eng.steps:
            eng.galois = eng._load(seal.GaloisKeys(), blobs["galois"], "Galois keys")
            missing = [s for s in eng.steps
                       if not eng.galois.has_key(galois_element(s, params.poly_degree))]
            if missing:
                raise ProtocolAbort(f"the client's Galois keys lack steps {missing[:5]}")
        eng.encryptor = seal.Encryptor(eng.ctx, eng._public)
        return eng

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._secret = None          # drop the secret key's last reference
        self.decryptor = None

    # ---- serialisation (SEAL's format, validated by SEAL on load; never pickle) ------------
    def _save(self, obj) -> bytes:
        path = os.path.join(self._tmp, "blob")
        obj.save(path)
        with open(path, "rb") as f:
            data = f.read()
        os.remove(path)
        return data

    def _load(self, obj, data: bytes, what: str):
        path = os.path.join(self._tmp, "blob")
        with open(path, "wb") as f:
            f.write(data)
        try:
            obj.load(self.ctx, path)
        except (RuntimeError, ValueError) as exc:
            raise ProtocolAbort(f"received {what} that SEAL rejects ({exc}): corrupt, truncated "
                                "or made for other parameters") from None
        finally:
            os.remove(path)
        return obj

    def dumps(self, ct: Ct) -> bytes:
        return self._save(ct)

    def loads(self, data: bytes, what: str = "ciphertext") -> Ct:
        ct = self._load(Ct(), data, what)
        if ct.size() != 2 or ct.parms_id() not in self._parms_at.values():
            raise ProtocolAbort(f"received a {what} of size {ct.size()} or unknown parameters")
        if abs(ct.scale / self.scale - 1) > 1e-9:
            raise ProtocolAbort(f"received a {what} at scale {ct.scale:g}, expected {self.scale:g}")
        return ct

    # ---- encoding -------------------------------------------------------------------------
    def level(self, ct: Ct) -> int:
        return self.ctx.get_context_data(ct.parms_id()).chain_index()

    def _vector(self, vec: np.ndarray) -> list[float]:
        vec = np.asarray(vec, dtype=np.float64).ravel()
        if vec.size > self.slots:
            raise ConfigError(f"{vec.size} values do not fit {self.slots} slots")
        return vec.tolist()

    def encode(self, vec: np.ndarray, level: int, scale: float) -> seal.Plaintext:
        t0 = time.perf_counter()
        pt = seal.Plaintext()
        self.encoder.encode(self._vector(vec), self._parms_at[level], scale, pt)
        self.counters.add("encode", time.perf_counter() - t0)
        return pt

    def encrypt(self, vec: np.ndarray) -> Ct:
        pt = self.encode(vec, self.params.levels, self.scale)
        ct = Ct()
        self.encryptor.encrypt(pt, ct)
        return ct

    def decrypt(self, ct: Ct) -> np.ndarray:
        if self.decryptor is None:
            raise ConfigError("only the client (the secret key's holder) decrypts")
        pt = seal.Plaintext()
        self.decryptor.decrypt(ct, pt)
        return np.asarray(self.encoder.decode_double(pt))

    # ---- arithmetic -----------------------------------------------------------------------
    def _timed(self, kind: str, t0: float) -> None:
        self.counters.add(kind, time.perf_counter() - t0)

    def mod_to(self, ct: Ct, level: int) -> Ct:
        """`ct` dropped to `level` (no copy when it is already there)."""
        have = self.level(ct)
        if have == level:
            return ct
        if have < level:
            raise ConfigError(f"cannot raise a ciphertext from level {have} to {level}")
        t0 = time.perf_counter()
        out = Ct()
        self.evaluator.mod_switch_to(ct, self._parms_at[level], out)
        self._timed("modswitch", t0)
        return out

    def _align(self, a: Ct, b: Ct) -> tuple[Ct, Ct]:
        la, lb = self.level(a), self.level(b)
        return (self.mod_to(a, lb), b) if la > lb else (a, self.mod_to(b, la))

    def add(self, a: Ct, b: Ct) -> Ct:
        a, b = self._align(a, b)
        t0 = time.perf_counter()
        out = Ct()
        self.evaluator.add(a, b, out)
        self._timed("add", t0)
        return out

    def sub(self, a: Ct, b: Ct) -> Ct:
        a, b = self._align(a, b)
        t0 = time.perf_counter()
        out = Ct()
        self.evaluator.sub(a, b, out)
        self._timed("add", t0)
        return out

    def add_many(self, cts: list[Ct]) -> Ct:
        low = min(self.level(c) for c in cts)
        cts = [self.mod_to(c, low) for c in cts]
        t0 = time.perf_counter()
        out = Ct()
        self.evaluator.add_many(cts, out)
        self._timed("add", t0, )
        return out

    def add_plain(self, ct: Ct, vec: np.ndarray) -> Ct:
        pt = self.encode(vec, self.level(ct), ct.scale)
        t0 = time.perf_counter()
        out = Ct()
        self.evaluator.add_plain(ct, pt, out)
        self._timed("add", t0)
        return out

    def _need(self, ct: Ct, what: str) -> int:
        level = self.level(ct)
        if level < 1:
            raise ConfigError(f"{what}: the ciphertext has no level left (the depth plan is wrong)")
        return level

    def multiplier(self, vec: np.ndarray, level: int) -> seal.Plaintext:
        """A plaintext to multiply a level-`level` ciphertext by (scale p_level: exact rescale)."""
        return self.encode(vec, level, self._prime_at[level])

    def mul_plain_raw(self, ct: Ct, pt: seal.Plaintext) -> Ct:
        """ct·pt without the rescale (for sums of products: rescale once with `rescale`)."""
        t0 = time.perf_counter()
        out = Ct()
        self.evaluator.multiply_plain(ct, pt, out)
        self._timed("pt_mul", t0)
        return out

    def rescale(self, ct: Ct) -> Ct:
        t0 = time.perf_counter()
        self.evaluator.rescale_to_next_inplace(ct)
        ct.scale = self.scale
        self._timed("rescale", t0)
        return ct

    def mul_plain(self, ct: Ct, vec: np.ndarray) -> Ct:
        level = self._need(ct, "plaintext product")
        return self.rescale(self.mul_plain_raw(ct, self.multiplier(vec, level)))

    def mul_const(self, ct: Ct, c: float) -> Ct:
        return self.mul_plain(ct, np.full(self.slots, c))

    def mul(self, a: Ct, b: Ct) -> Ct:
        a, b = self._align(a, b)
        self._need(a, "ciphertext product")
        t0 = time.perf_counter()
        out = Ct()
        if a is b:
            self.evaluator.square(a, out)
        else:
            self.evaluator.multiply(a, b, out)
        self.evaluator.relinearize_inplace(out, self.relin)
        self._timed("ct_mul", t0)
        return self.rescale(out)

    def rotate(self, ct: Ct, step: int) -> Ct:
        """Left rotation by `step` slots (negative: right), composed from the keyed steps."""
        step = (step + self.slots // 2) % self.slots - self.slots // 2
        if step == 0:
            return ct
        for s in self._compose(step):
            t0 = time.perf_counter()
            out = Ct()
            self.evaluator.rotate_vector(ct, s, self.galois, out)
            self._timed("rotate", t0)
            ct = out
        return ct

    def _compose(self, step: int) -> list[int]:
        if step in self.steps:
            return [step]
        out, rest = [], step
        for s in sorted((s for s in self.steps if s * step > 0), key=abs, reverse=True):
            while abs(rest) >= abs(s):
                out.append(s)
                rest -= s
        if rest:
            raise ConfigError(f"no Galois keys compose a rotation by {step} "
                              f"(keyed steps: {sorted(self.steps)})")
        return out

    def neg(self, ct: Ct) -> Ct:
        out = Ct()
        self.evaluator.negate(ct, out)
        return out

    def add_const(self, ct: Ct, c: float) -> Ct:
        return self.add_plain(ct, np.full(self.slots, c))

    def mul_sum(self, pairs: list[tuple[Ct, Ct]]) -> Ct:
        """Σ aᵢ·bᵢ with one relinearisation and one rescale for the whole sum."""
        low = min(min(self.level(a), self.level(b)) for a, b in pairs)
        if low < 1:
            raise ConfigError("ciphertext product: no level left (the depth plan is wrong)")
        acc = None
        t0 = time.perf_counter()
        for a, b in pairs:
            out = Ct()
            self.evaluator.multiply(self.mod_to(a, low), self.mod_to(b, low), out)
            if acc is None:
                acc = out
            else:
                self.evaluator.add_inplace(acc, out)
        self.evaluator.relinearize_inplace(acc, self.relin)
        self.counters.add("ct_mul", time.perf_counter() - t0, len(pairs))
        return self.rescale(acc)
