"""δ against the frozen base (`midtrain.delta_base: frozen`): the ReMiT weights fixed before training starts.

The paper's δ compares the reference with the model being trained (`live`, the default). Its motivating
figures compare it with the pre-trained base; with that base frozen, δ_t = log p_ref − log p_base is a
property of the data: both log-probs are cached by `score_reference` over the same packed windows, and the
weights (centring, mapping and clip unchanged, flywheel/remit/weights.py) are computed from the two caches
once, stored beside them, and read by the trainer like the reference's log-probs. They cost nothing while
training, can be inspected before it, are reused by every anneal that shares the reference, the base and the
weight settings, and do not drift as the student catches up.

Layout of `home/cache/frozen-weights/<key>/`: the reference cache's (chunk-00000.npy … with column 0 set to
0, and index.json written last, so `open_cache` reads and verifies it), in float32: the weights are applied
exactly as the live formula gives them (float16 would move the clip's ends, 1.2 to 1.2002, and hide which
tokens were clipped). The key hashes both caches' keys and the weight settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flywheel.config import FlywheelConfig, MidtrainConfig
from flywheel.data.io import distributed_rank, fingerprint, wait_until
from flywheel.errors import FlywheelError
from flywheel.remit.scoring import ReferenceCache, open_cache, score_reference, write_derived_cache

FROZEN_VERSION = 2  # 2: weights stored in float32 (1 stored them in midtrain.cache_dtype)
WEIGHTS_DTYPE = "float32"


@dataclass
class FrozenWeights:
    """The stored weights (read like a reference cache) and the base's cached log-probs they were made from."""

    weights: ReferenceCache
    base: ReferenceCache
    computed: bool  # False: an earlier anneal's weights, reused


def frozen_key(mt: MidtrainConfig, reference: ReferenceCache, base: ReferenceCache) -> str:
    """What the weights depend on: the two caches (each keyed by its model, corpus, packing, dtype) and the rule."""
    return fingerprint(FROZEN_VERSION, reference.index["key"], base.index["key"], mt.epsilon, mt.centring,
                       mt.mapping, mt.cache_dtype)


def weights_of_rows(mt: MidtrainConfig, ref: np.ndarray, base: np.ndarray, doc_ids: np.ndarray) -> np.ndarray:
    """(rows, seq_len) ReMiT weights of packed rows from their cached log-probs; column 0 (no target) is 0.

    Aligned as the trainer aligns them: position t ≥ 1 weighs the prediction of token t, every target is
    valid (packed rows are full) and each row's documents are centred on their own tokens.
    """
    import torch

    from flywheel.remit.weights import remit_weights

    def tensor(a: np.ndarray, dtype: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a[:, 1:], dtype=dtype))

    r, b = tensor(ref, np.float32), tensor(base, np.float32)
    w = remit_weights(r, b, torch.ones_like(r, dtype=torch.bool), mt.epsilon, tensor(doc_ids, np.int64),
                      mt.centring, mt.mapping)
    out = np.zeros(np.shape(ref), dtype=WEIGHTS_DTYPE)
    out[:, 1:] = w.numpy()
    return out


def frozen_weights(cfg: FlywheelConfig, reference: ReferenceCache, base: ReferenceCache, packed: Any
                   ) -> FrozenWeights:
    """The frozen-δ weights of the packed mixture: reused when stored, else computed from the two caches once.

    Under torchrun rank 0 writes them while the other ranks wait for the finished folder.
    """
    mt = cfg.midtrain
    if reference.index["rows"] != base.index["rows"] or reference.rows_per_chunk != base.rows_per_chunk:
        raise FlywheelError(f"frozen δ: the reference cache {reference.folder} and the base's {base.folder} do not "
                            "cover the same packed rows; delete both and run the anneal again")
    key = frozen_key(mt, reference, base)
    final = cfg.home / "cache" / "frozen-weights" / key
    rows, seq_len = len(packed), mt.seq_len
    computed = False
    if not (final / "index.json").exists():
        if distributed_rank()[0] == 0:
            def chunk(c: int, ref: np.ndarray) -> np.ndarray:
                lo = c * reference.rows_per_chunk
                return weights_of_rows(mt, ref, base.chunks[c], packed.doc_ids[lo:lo + len(ref)])

            write_derived_cache(reference, final, key, chunk, lambda: {
                "dtype": WEIGHTS_DTYPE, "weights_of": {"reference_cache": reference.index["key"],
                                                        "base_cache": base.index["key"], "epsilon": mt.epsilon,
                                                        "centring": mt.centring, "mapping": mt.mapping}})
            computed = True
        else:
            wait_until("rank 0 to write the frozen-δ weights", lambda: [] if (final / "index.json").exists()
                       else [str(final)])
    return FrozenWeights(open_cache(final, key, rows, seq_len, verify=not computed), base, computed)


def frozen_inputs(cfg: FlywheelConfig, base: str, reference: ReferenceCache, packed: Any) -> FrozenWeights:
    """Score the pre-anneal base over the mixture like a reference (cached, reused), then its frozen weights."""
    return frozen_weights(cfg, reference, score_reference(cfg, base).cache, packed)


def describe_base(delta_base: str) -> str:
    """The weight rule's suffix for the page and the run's parameters."""
    return ", δ against the frozen base" if delta_base == "frozen" else ""

