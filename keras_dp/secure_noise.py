"""The Gaussian sampler of secure mode (`secure_mode=True` on a DP optimizer).

Two weaknesses of the ordinary floating-point samplers matter to a DP
guarantee, and secure mode removes both:

- **The key.** The ordinary noise comes from a counter-based generator
  keyed once per process. In secure mode every draw is keyed afresh by
  the operating system's cryptographic entropy (`secrets`), read at every
  step (see `keras_dp.backend`'s `os_random_bits`), and the key is never
  stored.
- **The floating-point values.** A sampler that maps a uniform float to a
  Gaussian (Box-Muller, the inverse CDF) reaches only a sparse, structured
  set of values and bounds every draw (float32 uniforms stop near 5.4 to
  5.8 standard deviations); the attacks on floating-point DP samplers
  (Mironov 2012 for Laplace; Jin et al., S&P 2022, for the Gaussian
  samplers of DP-SGD libraries) read the noiseless value back from where
  a released value falls. Secure mode sums four independent Gaussians and
  halves the sum (Holohan and Braghin, "Secure random sampling in
  differential privacy", ESORICS 2021, which Opacus's secure mode also
  follows), so the reachable values are dense; and it draws each
  Box-Muller radius from 96 random bits instead of 24, so the tails are
  right out to `TAIL_BOUND` standard deviations.

Each Box-Muller pair takes four 32-bit words: one for the angle and a
chain of three for the radius. The radius is `sqrt(2 X)` with `X ~ Exp(1)`
drawn as `-log(u)` of a uniform `u`; when the first radius word is 0
(`u < 2^-32`), the exponential's memorylessness lets the next word draw
`X - 32 log 2` the same way, and so on. Only when all three words are 0
(probability `2^-96`) is the draw cut short, at `X = 97 log 2`: the one
place where the distribution differs from the exact one beyond floating
point rounding. `truncation_delta` turns that mass into the delta it can
add to a guarantee (below 1e-28 per coordinate and step: negligible for
any model).

A discrete Gaussian (Canonne, Kamath and Steinke 2020) would make the
sampler exact, but it needs gradients rounded onto a lattice (which
changes the sensitivity and the accounting) and a rejection sampler that
does not vectorize on accelerators; the sum of Gaussians keeps the
mechanism the accountant analyses and runs in the framework's own ops.

```python
words = np.random.default_rng(0).integers(0, 2**32, (WORDS_PER_NUMBER, 5))
z = keras_dp.secure_noise.normal_from_words(words)   # 5 numbers
```
"""

import math

from keras import ops

from keras_dp import backend as backend_lib

# Two Box-Muller pairs per number (four Gaussians), four words per pair.
WORDS_PER_NUMBER = 8
# Radius words per pair: the draw is cut short only when all are zero.
RADIUS_WORDS = 3
# The largest X = -log(u) the chain reaches: (RADIUS_WORDS - 1) full words
# of 32 log 2 each, then the last word's smallest midpoint 2^-33.
MAX_EXPONENTIAL = (32 * (RADIUS_WORDS - 1) + 33) * math.log(2.0)
# Every output is at most this many standard deviations: each pair's
# |cos| + |sin| is at most sqrt(2) times its radius, and the sum of two
# pairs is halved.
TAIL_BOUND = math.sqrt(2.0) * math.sqrt(2.0 * MAX_EXPONENTIAL)
# Probability that one output's draw was cut short (two pairs, each cut
# with probability 2^-96, where the exact radius would have been larger
# with probability 1/2 of the last word's cell).
TRUNCATED_MASS_PER_NUMBER = 2.0 * 2.0 ** (-32 * RADIUS_WORDS) * 0.5
# Numbers drawn at once: bounds the words' memory (8 words per number).
CHUNK = 1 << 22

_TWO_TO_MINUS_32 = 2.0**-32
_LOG_TWO_TO_32 = 32 * math.log(2.0)


def truncation_delta(coordinates, steps):
    """The total variation distance between `steps` noise draws of
    `coordinates` numbers each from this sampler's radius chain and from
    one with an unbounded chain: what secure mode's truncated tails can
    add to a guarantee's delta (`coordinates * steps` times the mass cut
    from one number)."""
    return float(coordinates) * float(steps) * TRUNCATED_MASS_PER_NUMBER


def standard_normal(shape, seed_generator):
    """Standard normal float32 numbers of static `shape` from words that
    the backend's `os_random_bits` keys afresh from the operating system's
    entropy (`seed_generator` is the optimizer's noise seed generator,
    whose counter the TensorFlow backend mixes into the key)."""
    size = math.prod(shape)
    backend = backend_lib.get_backend_module()
    parts = []
    for start in range(0, size, CHUNK):
        count = min(CHUNK, size - start)
        words = backend.os_random_bits((WORDS_PER_NUMBER, count), seed_generator)
        parts.append(normal_from_words(words))
    flat = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=0)
    return ops.reshape(flat, shape)


def normal_from_words(words):
    """Standard normal float32 numbers from `(WORDS_PER_NUMBER, n)` words
    uniform on `[0, 2^32)` (any integer dtype that holds them): the sum of
    two Box-Muller pairs' four Gaussians, halved."""
    words = ops.convert_to_tensor(words)
    total = None
    for pair in range(2):
        angle, *radius = (words[4 * pair + k] for k in range(4))
        radius = ops.sqrt(2.0 * exponential_from_words(radius))
        theta = (2.0 * math.pi) * _unit_midpoint(angle)
        pair_sum = radius * (ops.cos(theta) + ops.sin(theta))
        total = pair_sum if total is None else total + pair_sum
    return 0.5 * total


def exponential_from_words(radius_words):
    """`Exp(1)` float32 numbers from a chain of `RADIUS_WORDS` word arrays
    (see the module docstring): `-log(u)` of the first nonzero word's
    midpoint `u`, plus `32 log 2` for each zero word before it."""
    first = radius_words[-1]
    for word in reversed(radius_words[:-1]):
        first = ops.where(ops.equal(word, 0), first, word)
    zeros_before = ops.zeros(ops.shape(first), "float32")
    leading = ops.ones(ops.shape(first), "bool")
    for word in radius_words[:-1]:
        leading = ops.logical_and(leading, ops.equal(word, 0))
        zeros_before = zeros_before + ops.cast(leading, "float32")
    return _LOG_TWO_TO_32 * zeros_before - ops.log(_unit_midpoint(first))


def _unit_midpoint(word):
    """`(word + 1/2) / 2^32`: uniform in (0, 1) for a uniform 32-bit
    word, never 0 or 1."""
    return (ops.cast(word, "float32") + 0.5) * _TWO_TO_MINUS_32
