"""Where DP randomness comes from: a secret per-site key, never the run's public seed.

Every random choice a DP mechanism makes -- which patients a step samples, the Gaussian noise on
the clipped sum, the noise on the adaptive-clipping count -- is drawn from a keystream of
ChaCha20 (Bernstein 2008; RFC 8439) keyed by a 256-bit key made with :mod:`secrets`. The
key stays in the site's local state (``<state-dir>/dp_noise.key``, mode 0600); it is never put
in a config, a message, a log, a ledger or a certificate. Anyone who knows the run's seed, the
model before and after a round and the code still cannot regenerate the noise, so the
Gaussian mechanism's guarantee holds against the server and the other sites.

Draw ``purpose`` at index ``i`` (a step, a round) reads a keystream whose nonce is
HMAC-SHA256(key, purpose:i). A mechanism never draws from the site's key directly: each
release draws from :meth:`NoiseSource.bound` to the fingerprint of everything that goes into
it (scope, round, steps, plan, input model, optimiser state -- :mod:`privseg.privacy.site`), so
the same index under other inputs reads another keystream. Reused noise would cancel in a
difference of two releases (``C2 r1 - C1 r2`` leaves the clipped sums); bound noise repeats
only for a request identical in every input, whose output is the same release again. A
derived run (an erasure's retrain or calibration) also gets a fresh key.

Uniforms take 53 bits of the stream; Gaussians come from the Box--Muller transform. (Floating
point noise has known weaknesses in its lowest bits -- Mironov, "On Significance of the Least
Significant Bits for Differential Privacy", CCS 2012; the model update adds the noise to a
sum of clipped gradients and is rounded to float32, which masks those bits in practice; see
docs/privacy.md.)

``NoiseSource.reproducible(seed)`` derives the key from the public seed, for tests and
benchmarks that must repeat bit for bit across runs. It warns, and everything it touches is
stamped "not private" (the way Opacus separates ``secure_mode``).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from privseg.errors import DataError

KEY_FILE = "dp_noise.key"
KEY_BYTES = 32
_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_CHUNK))
SECRET = "secret"
REPRODUCIBLE = "reproducible (not private)"


class ReproducibleNoiseWarning(UserWarning):
    """DP noise derived from a public seed: fine for a test, no privacy at all in production."""


@dataclass(frozen=True)
class NoiseSource:
    """A keyed source of DP randomness (see the module docstring)."""

    key: bytes = field(repr=False)
    private: bool = True

    @property
    def kind(self) -> str:
        return SECRET if self.private else REPRODUCIBLE

    # -- making one ---------------------------------------------------------------------
    @classmethod
    def ephemeral(cls) -> NoiseSource:
        """A fresh secret key held in memory only (private; a resume cannot repeat its noise)."""
        return cls(secrets.token_bytes(KEY_BYTES), True)

    @classmethod
    def reproducible(cls, seed: int) -> NoiseSource:
        warnings.warn("DP noise is derived from the public seed: anyone with the run config can regenerate it and "
                      "the run has NO privacy guarantee (use only for tests and benchmarks)",
                      ReproducibleNoiseWarning, stacklevel=2)
        return cls(hashlib.sha256(f"privseg-reproducible-noise:{int(seed)}".encode()).digest(), False)

    @classmethod
    def for_state_dir(cls, state_dir: str | Path, name: str = KEY_FILE) -> NoiseSource:
        """The secret key kept in ``state_dir`` (made on first use, read back on resume)."""
        path = Path(state_dir) / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, secrets.token_bytes(KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:  # two processes racing to create it: the first link wins, both use that key
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise DataError(path, f"DP noise key has {len(key)} bytes, not {KEY_BYTES}: the file is damaged. "
                                  "A new key would change the noise of rounds already released; restore the file")
        return cls(key, True)

    def bound(self, context: str | bytes) -> NoiseSource:
        """The source for one release: a key derived as HMAC(key, "bind:" + context), where
        ``context`` fingerprints every input of the release. Draws under two different contexts
        are independent; under the same context they repeat (same inputs, same release)."""
        ctx = context.encode() if isinstance(context, str) else bytes(context)
        return NoiseSource(hmac.new(self.key, b"bind:" + ctx, hashlib.sha256).digest(), self.private)

    # -- drawing --------------------------------------------------------------------------
    def _stream(self, purpose: str, index: int, nbytes: int) -> bytearray:
        """``nbytes`` of the keystream of (purpose, index), in a writable buffer (encrypting zeros in
        place: no second copy of a stream that is 8 bytes per model parameter)."""
        nonce = b"\0\0\0\0" + hmac.new(self.key, f"{purpose}:{int(index)}".encode(), hashlib.sha256).digest()[:12]
        buf = bytearray(nbytes + 63)  # update_into wants room for a block more than it writes
        out = memoryview(buf)
        encryptor = Cipher(algorithms.ChaCha20(self.key, nonce), mode=None).encryptor()
        # in chunks (the same stream): the cipher holds the GIL while it runs, so a draw made on a
        # background thread lets the training thread go on between chunks
        done = 0
        while done < nbytes:
            size = min(_CHUNK, nbytes - done)
            done += encryptor.update_into(_ZEROS[:size], out[done:])
        out.release()
        del buf[done:]
        return buf

    def uniform(self, purpose: str, index: int, size: int) -> np.ndarray:
        """``size`` floats, uniform in (0, 1)."""
        words = np.frombuffer(self._stream(purpose, index, 8 * int(size)), dtype="<u8")
        np.right_shift(words, np.uint64(11), out=words)  # in place: the same values, fewer temporaries
        out = words.astype(np.float64)
        out += 0.5
        out *= 2.0 ** -53
        return out

    def gaussian(self, purpose: str, index: int, size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``size`` standard normal draws (CPU), Box--Muller in float64; ``dtype=torch.float32``
        rounds each float64 draw once, exactly as ``.to(torch.float32)`` would, without a float64 copy."""
        half = (int(size) + 1) // 2
        u = torch.from_numpy(self.uniform(purpose, index, 2 * half))
        # sqrt(-2 log u1) * (cos, sin)(2 pi u2), in place and straight into the output
        radius = u[:half].log_().mul_(-2.0).sqrt_()
        angle = u[half:].mul_(2.0 * math.pi)
        out = torch.empty(2 * half, dtype=dtype)
        torch.mul(radius, torch.cos(angle), out=out[:half])
        torch.mul(radius, angle.sin_(), out=out[half:])
        return out[: int(size)]

    def integer(self, purpose: str, index: int, high: int = 2 ** 31) -> int:
        return int(np.frombuffer(self._stream(purpose, index, 8), dtype="<u8")[0] % np.uint64(high))
