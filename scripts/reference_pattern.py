"""The reference pattern shared with `src/init.rs` (`reference_pattern`, `Init::Reference`).

Element i of tensor `key` is (m - 2**23) * bound * 2**-23 in float32, where m is the top 24 bits
of splitmix64(seed ^ fnv1a64(key), i). Every step is exact or one IEEE rounding, so numpy and
Rust produce the same bits, and full-size weights never need to be committed.
"""
import numpy as np

MASK = (1 << 64) - 1


def fnv1a64(key: str) -> int:
    h = 0xCBF29CE484222325
    for b in key.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


def reference_pattern(key: str, seed: int, shape, bound: float) -> np.ndarray:
    numel = int(np.prod(shape))
    base = np.uint64((seed ^ fnv1a64(key)) & MASK)
    with np.errstate(over="ignore"):
        i = np.arange(1, numel + 1, dtype=np.uint64)
        z = base + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    m = ((z >> np.uint64(40)).astype(np.int64) - (1 << 23)).astype(np.float32)
    values = (m * np.float32(bound)) * np.float32(2.0**-23)
    return values.reshape(shape)


def reference_layer(prefix: str, seed: int, weight_shape):
    """Weight and bias of a conv/linear layer, as `Init::Reference` makes them."""
    fan_in = int(np.prod(weight_shape[1:]))
    bound = np.float32(np.sqrt(6.0 / fan_in))
    weight = reference_pattern(f"{prefix}.weight", seed, weight_shape, bound)
    bias = reference_pattern(f"{prefix}.bias", seed, (weight_shape[0],), 0.1)
    return weight, bias
