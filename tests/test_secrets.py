"""Secret randomness: the keyed CSPRNG (veil/csprng.py), its statistics, and that every secret a
TEE scheme draws comes from it — fresh per load, deaf to torch's global seed."""

from __future__ import annotations

import io
import math
import re
import time
import tokenize
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import veil
from veil.csprng import RNG_PREFIX, Keystream, SecretRng, new_key
from veil.tee.pads import PadStream

KEY = bytes(32)         # a fixed test key: statistical checks below are deterministic
# chi-square critical values at p = 1e-4, by degrees of freedom
CHI2_CRIT = {2: 18.42, 5: 25.74, 7: 29.88, 9: 33.72}


def drawn(m, kind: str) -> torch.Tensor:
    """One kind of secret draw of a loaded model, flattened. The only place these tests reach
    into a loaded model (today through `m.ops`)."""
    ops = m.ops
    if kind == "bank":
        return torch.cat([t.flatten() for t in [*ops.bank.bank_b.values(), *ops.bank.bank_a.values()]])
    if kind == "mixing":
        return torch.cat([torch.cat([p.q_heads.double(), p.r.flatten().double(), p.s.flatten().double()])
                          for p in ops.perms])
    if kind == "perm_in":
        return torch.cat([o.perm_in for o in ops.protocol.obf.values()])
    if kind == "freivalds":
        return torch.cat(list(ops.verifier.r.values()))
    raise KeyError(kind)


def chi2(counts: Counter, cells: int) -> float:
    total = sum(counts.values())
    expected = total / cells
    return sum((counts.get(c, 0) - expected) ** 2 / expected for c in range(cells))


# --- the construction ---------------------------------------------------------------------------

def test_same_key_same_stream_other_key_other_stream():
    a, b = SecretRng(KEY), SecretRng(KEY)
    assert torch.equal(a.randn(1000), b.randn(1000))
    assert torch.equal(a.perm(50), b.perm(50)) and a.randbelow(10 ** 9) == b.randbelow(10 ** 9)
    assert not torch.equal(SecretRng(KEY).randn(1000), SecretRng(bytes(31) + b"\x01").randn(1000))
    assert not torch.equal(SecretRng().randn(1000), SecretRng().randn(1000))    # fresh OS keys
    # consecutive draws use fresh counter blocks: no keystream is repeated
    c = SecretRng(KEY)
    assert not torch.equal(c.randn(1000), c.randn(1000))


@pytest.mark.parametrize("key", [bytes(16), bytes(31), bytes(33), b"", "0" * 32, 42])
def test_keys_other_than_256_bits_are_rejected(key):
    with pytest.raises(ValueError, match="32 bytes"):
        SecretRng(key)
    with pytest.raises(ValueError, match="32 bytes"):
        Keystream(key)


def test_new_keys_are_fresh_256_bit_keys():
    keys = {new_key() for _ in range(8)}
    assert len(keys) == 8 and all(len(k) == 32 for k in keys)


def test_counter_block_layouts_known_answers():
    """SecretRng's block n is 0xFF×8 | n (big-endian); PadStream's is epoch u32 | group u32 |
    index u64: checked against AES-ECB computed here, independently of veil.csprng."""
    aes = Cipher(algorithms.AES(KEY), modes.ECB()).encryptor()
    rng_block = RNG_PREFIX.to_bytes(8, "big") + (0).to_bytes(8, "big")
    # randbelow(2^128) is exactly one block's 128 bits, little-endian
    assert SecretRng(KEY).randbelow(1 << 128) == int.from_bytes(aes.update(rng_block), "little")
    pads = PadStream()
    pads.keystream = Keystream(KEY)
    epoch, group = 3, 7
    blocks = b"".join(epoch.to_bytes(4, "big") + group.to_bytes(4, "big") + i.to_bytes(8, "big")
                      for i in range(PadStream.stride(64)))
    words = np.frombuffer(aes.update(blocks), dtype=np.uint32)
    u1 = ((words[0::2] >> 8).astype(np.float64) + 0.5) * 2.0 ** -24
    theta = (words[1::2] >> 8).astype(np.float64) * 2 * math.pi * 2.0 ** -24
    expected = np.empty(len(words))
    expected[0::2] = np.sqrt(-2 * np.log(u1)) * np.cos(theta)
    expected[1::2] = np.sqrt(-2 * np.log(u1)) * np.sin(theta)
    row = pads.rows(epoch, group, 0, 1, 64)[0].double().numpy()
    assert np.allclose(row, expected[:64], atol=1e-5)


# --- distributions ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_randn_is_unit_gaussian(dtype):
    z = SecretRng(KEY).randn(1000, 1000, dtype=dtype)
    assert z.shape == (1000, 1000) and z.dtype == dtype and bool(torch.isfinite(z).all())
    x = z.double().flatten()
    # standard errors on 1e6 draws: mean 1e-3, std 7e-4; bounds at ~4σ
    assert abs(float(x.mean())) < 4e-3 and abs(float(x.std()) - 1) < 3e-3
    assert abs(float((x < 1).double().mean()) - 0.841345) < 2e-3          # Φ(1), s.e. 3.7e-4
    assert abs(float((x.abs() > 3).double().mean()) - 0.0026998) < 3e-4    # tails, s.e. 5e-5
    assert abs(float((x ** 4).mean()) - 3) < 0.05                           # kurtosis, s.e. 0.01


def test_randn_shapes():
    rng = SecretRng(KEY)
    assert rng.randn(3, 5).shape == rng.randn((3, 5)).shape == (3, 5)
    assert rng.randn(7).shape == (7,) and rng.randn(()).shape == () and rng.randn(0).numel() == 0
    with pytest.raises(ValueError, match="float32 or float64"):
        rng.randn(3, dtype=torch.float16)


def test_gaussians_are_fast():
    rng = SecretRng(KEY)
    best = min(_timed(lambda: rng.randn(4_000_000)) for _ in range(3))
    assert best < 1.0, f"4M float32 Gaussians took {best:.2f} s"
    best = min(_timed(lambda: rng.perm(49152)) for _ in range(3))
    assert best < 0.5, f"a permutation of 49152 took {best:.2f} s"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_range_and_mean(dtype):
    u = SecretRng(KEY).uniform((200_000,), 0.5, 2.0, dtype=dtype)
    assert u.dtype == dtype and float(u.min()) >= 0.5 and float(u.max()) <= 2.0
    assert abs(float(u.double().mean()) - 1.25) < 4e-3                      # s.e. 1e-3
    assert abs(float((u < 0.875).double().mean()) - 0.25) < 4e-3            # first quarter
    assert SecretRng(KEY).uniform(4, -1.0, 1.0).shape == (4,)
    with pytest.raises(ValueError, match="low < high"):
        SecretRng(KEY).uniform(4, 1.0, 1.0)


@pytest.mark.parametrize("n", [3, 6])
def test_randbelow_is_unbiased(n):
    rng = SecretRng(KEY)
    counts = Counter(rng.randbelow(n) for _ in range(12_000 * n // 3))
    assert set(counts) == set(range(n))
    assert chi2(counts, n) < CHI2_CRIT[n - 1]


def test_randbelow_rejects_instead_of_reducing_mod_n():
    """n = 3·2^30: a 32-bit word mod n would land below 2^30 half the time; uniform is a third."""
    n = 3 << 30
    rng = SecretRng(KEY)
    draws = [rng.randbelow(n) for _ in range(6000)]
    assert max(draws) < n and abs(sum(d < 1 << 30 for d in draws) / 6000 - 1 / 3) < 0.025
    vec = SecretRng(KEY).randint(0, n, (60_000,))
    assert int(vec.max()) < n and abs(float((vec < 1 << 30).double().mean()) - 1 / 3) < 0.01


def test_randbelow_edges():
    rng = SecretRng(KEY)
    assert rng.randbelow(1) == 0
    big = [rng.randbelow(10 ** 40) for _ in range(50)]
    assert all(0 <= b < 10 ** 40 for b in big) and max(big) > 10 ** 39
    for bad in (0, -3):
        with pytest.raises(ValueError, match="n ≥ 1"):
            rng.randbelow(bad)


def test_randint_bounds_and_cover():
    rng = SecretRng(KEY)
    x = rng.randint(-5, 5, (40, 50))
    assert x.shape == (40, 50) and x.dtype == torch.int64
    assert set(x.flatten().tolist()) == set(range(-5, 5))
    counts = Counter((x + 5).flatten().tolist())
    assert chi2(counts, 10) < CHI2_CRIT[9]
    assert rng.randint(7, 8, 5).tolist() == [7] * 5
    assert 0 <= int(rng.randint(0, 1 << 32, ()).item()) < 1 << 32
    for low, high in ((3, 3), (0, (1 << 32) + 1)):
        with pytest.raises(ValueError, match="high − low"):
            rng.randint(low, high, 4)


def test_perm_is_a_uniform_permutation():
    rng = SecretRng(KEY)
    p = rng.perm(1000)
    assert p.dtype == torch.long and sorted(p.tolist()) == list(range(1000))
    assert rng.perm(0).numel() == 0 and rng.perm(1).tolist() == [0]
    orders = sorted({(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)})
    counts = Counter(orders.index(tuple(rng.perm(3).tolist())) for _ in range(6000))
    assert chi2(counts, 6) < CHI2_CRIT[5]
    # every position of a longer permutation is uniform too: where 0 lands among 8
    where = Counter(int((rng.perm(8) == 0).nonzero()) for _ in range(4000))
    assert chi2(where, 8) < CHI2_CRIT[7]


def test_sign_is_balanced():
    rng = SecretRng(KEY)
    signs = [rng.sign() for _ in range(4000)]
    assert set(signs) == {1.0, -1.0} and abs(signs.count(1.0) / 4000 - 0.5) < 0.03


# --- use: every load draws its own secrets ------------------------------------------------------

@pytest.mark.parametrize("seeded", [False, True], ids=["fresh", "same-global-seed"])
@pytest.mark.parametrize("scheme,options,kinds", [
    ("loro", {}, ("bank", "mixing")),
    ("loro", {"verify": True}, ("freivalds",)),
    ("tlg", {}, ("perm_in", "mixing")),
])
def test_two_loads_draw_different_secrets(scheme, options, kinds, seeded):
    models = []
    for _ in range(2):
        if seeded:
            torch.manual_seed(0)        # a caller's global seed must not reach the secrets
        models.append(veil.load("tiny-llama", scheme=scheme, **options))
    for kind in kinds:
        a, b = (drawn(m, kind) for m in models)
        assert a.shape == b.shape and not torch.equal(a, b), kind


# --- no other source of secret randomness -------------------------------------------------------

ROOT = Path(veil.__file__).resolve().parent
FORBIDDEN = {
    "torch generator": r"\btorch\.Generator\b|\bmanual_seed\b|\bgenerator\s*=",
    "torch sampler": r"\btorch\.(randn|rand|randint|randperm|normal|bernoulli|multinomial|poisson"
                     r"|randn_like|rand_like|randint_like)\s*\(",
    "in-place torch sampler": r"\.(uniform_|normal_|random_|bernoulli_|exponential_|cauchy_"
                              r"|geometric_|log_normal_)\s*\(",
    "numpy random": r"\bnp\.random\b|\bnumpy\.random\b|from\s+numpy\s+import\s+random\b",
    "random module": r"^\s*import\s+random\b|^\s*from\s+random\s+import\b",
    "secrets module": r"^\s*import\s+secrets\b|^\s*from\s+secrets\s+import\b"
                      r"|\bsecrets\.(randbelow|randbits|choice|token_\w+|SystemRandom)\b",
}


def _code_only(source: str) -> str:
    """The source with comments and string literals blanked (docstrings may name what is
    forbidden, e.g. to say why)."""
    lines = source.splitlines(keepends=True)
    blank = {tokenize.COMMENT, tokenize.STRING}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in blank:
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for r in range(r0, r1 + 1):
            line = lines[r - 1]
            a = c0 if r == r0 else 0
            b = c1 if r == r1 else len(line.rstrip("\n"))
            lines[r - 1] = line[:a] + " " * (b - a) + line[b:]
    return "".join(lines)


def test_secret_material_comes_only_from_the_keyed_csprng():
    """In scope: every module under veil/tee/ (the enclave, the schemes' protect steps, pads,
    Freivalds checks, sealing) and veil/csprng.py — everything that draws keys, masks, pads,
    permutations, rotations, checks or calibration input. None may use torch's or numpy's
    generators (63-bit seeds at most, Mersenne Twister's state recoverable from its outputs,
    and global seeds any caller can set) or the `random` / `secrets` modules: secrets come from
    `SecretRng`, keys from `new_key`.
    Out of scope: sampling in veil/model/generate.py picks the user's next token (a `seed` makes
    it reproducible on purpose), and veil/model/zoo.py's presets are random test weights; neither
    is a secret kept from the device."""
    files = sorted((ROOT / "tee").rglob("*.py")) + [ROOT / "csprng.py"]
    assert len(files) > 10
    found = []
    for path in files:
        code = _code_only(path.read_text())
        for what, pattern in FORBIDDEN.items():
            for m in re.finditer(pattern, code, flags=re.MULTILINE):
                line = code.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(ROOT.parent)}:{line}: {what} ({m.group(0).strip()})")
    assert not found, "\n".join(found)


def test_the_scan_sees_what_it_forbids():
    code = _code_only('"""torch.randn( in a docstring is fine"""\n'
                      "import secrets  # comment: np.random\n"
                      "x = torch.randn(3, generator=g)\n"
                      "y = secrets.values()\n")
    hits = {what for what, p in FORBIDDEN.items() if re.search(p, code, flags=re.MULTILINE)}
    assert hits == {"secrets module", "torch sampler", "torch generator"}
