"""Sampling without sorts: the kept sets against an exact numpy reference, the draws against the
Gumbel-max trick over them, and sampled frequencies against the renormalised distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from model import sampling
from model.sampling import SamplingParams, kept_tokens, row_key, sample

VOCAB = 400  # over CANDIDATES (128): both the candidate path and the exact fallback are reached
AMBIGUOUS = 1e-5  # a token whose mass before it is this close to top_p may go either way


def params(b: int, temperature=1.0, top_k=0, top_p=1.0, seed=0) -> SamplingParams:
    def col(value, dtype):
        return jnp.asarray(np.broadcast_to(np.asarray(value, dtype), (b,)).copy())

    return SamplingParams(
        col(temperature, np.float32),
        col(top_k, np.int32),
        col(top_p, np.float32),
        col(seed, np.int32),
    )


def reference_kept(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(kept [b, v], ambiguous [b, v]) by sorting in float64: highest logit first, ties by the
    lower id; top-k first, then top-p over the top-k set renormalised at the temperature."""
    b, v = logits.shape
    kept, ambiguous = np.zeros((b, v), bool), np.zeros((b, v), bool)
    for row in range(b):
        x = logits[row].astype(np.float64)
        order = np.lexsort((np.arange(v), -x))
        top_k, top_p = int(p.top_k[row]), float(p.top_p[row])
        k = top_k if 0 < top_k < v else v
        temperature = max(float(p.temperature[row]), 1e-6)
        z = x[order][:k] / temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        keep = before < top_p if top_p < 1 else np.ones(k, bool)
        kept[row, order[:k]] = keep
        if top_p < 1:
            ambiguous[row, order[:k]] = np.abs(before - top_p) < AMBIGUOUS
    return kept, ambiguous


def case_logits(rng: np.random.Generator) -> tuple[np.ndarray, SamplingParams]:
    """Rows covering the paths and edges: flat and peaky, heavy ties (also across the top-k cut
    and the top-p boundary), one dominant token, top_p 1, top_k beyond the vocabulary, top_k
    over the candidates, top_k 1 and a tiny top_p."""
    flat = rng.normal(size=VOCAB) * 0.3
    peaky = rng.normal(size=VOCAB) * 4.0
    ties = rng.integers(0, 6, VOCAB) / 2.0  # ~67 tokens per value
    few_ties = np.round(rng.normal(size=VOCAB) * 2.0, 1)
    dominant = rng.normal(size=VOCAB)
    dominant[17] = 60.0
    rows = [
        (flat, 0.7, 0, 0.9),  # flat: the nucleus is past the candidates (exact fallback)
        (peaky, 0.7, 0, 0.9),  # settled within the candidates
        (peaky, 1.0, 50, 1.0),
        (flat, 1.3, 50, 0.5),
        (ties, 1.0, 70, 1.0),  # the top-k cut inside a tie
        (ties, 1.0, 0, 0.5),  # the top-p boundary inside a tie, fallback
        (ties, 1.0, 200, 0.3),  # top_k over the candidates, then top-p, ties everywhere
        (few_ties, 0.8, 0, 0.7),
        (few_ties, 0.8, 300, 1.0),
        (dominant, 1.0, 0, 0.9),
        (dominant, 1.0, 0, 1.0),  # top_p 1: everything
        (flat, 1.0, VOCAB + 5, 1.0),  # top_k beyond the vocabulary: everything
        (flat, 1.0, VOCAB + 5, 0.95),
        (peaky, 1.0, 1, 1.0),
        (flat, 2.0, 0, 1e-6),
        (flat, 0.5, 129, 0.99),
    ]
    logits = np.stack([r[0] for r in rows]).astype(np.float32)
    p = SamplingParams(
        jnp.asarray([r[1] for r in rows], jnp.float32),
        jnp.asarray([r[2] for r in rows], jnp.int32),
        jnp.asarray([r[3] for r in rows], jnp.float32),
        jnp.arange(len(rows), dtype=jnp.int32),
    )
    return logits, p


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, SamplingParams]:
    return case_logits(np.random.default_rng(0))


@pytest.mark.parametrize("exact", [False, True])
def test_kept_set_matches_the_sorted_reference(case, exact: bool) -> None:
    logits, p = case
    got = np.asarray(jax.jit(kept_tokens, static_argnames="exact")(logits, p, exact=exact))
    want, ambiguous = reference_kept(logits, p)
    differ = (got != want) & ~ambiguous
    assert not differ.any(), np.argwhere(differ)[:10].tolist()
    sizes = want.sum(axis=1)
    assert sizes[9] == 1 and sizes[10] == sizes[11] == VOCAB  # dominant, top_p 1, top_k > vocab
    assert sizes[4] == 70 and sizes[13] == sizes[14] == 1
    assert sizes[0] > sampling.CANDIDATES > sizes[1]  # both paths are exercised


def test_random_logits_with_ties(case) -> None:
    rng = np.random.default_rng(3)
    b = 24
    logits = rng.integers(0, 12, (b, VOCAB)).astype(np.float32) / 3.0
    p = SamplingParams(
        jnp.asarray(rng.uniform(0.3, 2.0, b), jnp.float32),
        jnp.asarray(rng.choice([0, 1, 5, 64, 128, 129, 300, VOCAB], b), jnp.int32),
        jnp.asarray(rng.choice([1.0, 0.95, 0.5, 0.1, 0.01], b), jnp.float32),
        jnp.arange(b, dtype=jnp.int32),
    )
    got = np.asarray(jax.jit(kept_tokens)(logits, p))
    want, ambiguous = reference_kept(logits, p)
    assert not ((got != want) & ~ambiguous).any()


def gumbel_max_reference(logits: np.ndarray, p: SamplingParams, index: np.ndarray) -> np.ndarray:
    """The argmax over the reference kept set of logits / T + jax.random.gumbel(row key)."""
    kept, _ = reference_kept(logits, p)
    out = []
    for row in range(logits.shape[0]):
        temperature = float(p.temperature[row])
        if temperature == 0:
            out.append(int(np.argmax(logits[row])))
            continue
        key = row_key(p.seed[row], jnp.int32(index[row]))
        noise = np.asarray(jax.random.gumbel(key, logits.shape[-1:], jnp.float32))
        z = logits[row] / np.float32(temperature)
        out.append(int(np.argmax(np.where(kept[row], z + noise, -np.inf))))
    return np.asarray(out)


def test_draws_are_gumbel_max_over_the_kept_set(case) -> None:
    logits, p = case
    index = np.arange(logits.shape[0], dtype=np.int32) * 7
    got = np.asarray(jax.jit(sample)(logits, p, jnp.asarray(index)))
    np.testing.assert_array_equal(got, gumbel_max_reference(logits, p, index))


def test_greedy_rows_and_an_all_greedy_batch(case) -> None:
    logits, p = case
    greedy = p._replace(temperature=jnp.zeros_like(p.temperature))
    index = jnp.zeros(logits.shape[0], jnp.int32)
    np.testing.assert_array_equal(sample(logits, greedy, index), np.argmax(logits, axis=-1))
    mixed = p._replace(temperature=p.temperature.at[::2].set(0.0))
    got = np.asarray(sample(logits, mixed, index))
    np.testing.assert_array_equal(got[::2], np.argmax(logits[::2], axis=-1))


def test_a_rows_draw_does_not_depend_on_its_batch(case) -> None:
    """Alone, with rows that take the exact fallback, with greedy rows: the same token."""
    logits, p = case
    p = p._replace(temperature=p.temperature.at[3].set(0.0))
    index = jnp.arange(logits.shape[0], dtype=jnp.int32)
    draw = jax.jit(sample)
    together = np.asarray(draw(logits, p, index))
    for row in range(logits.shape[0]):
        alone = draw(
            logits[row : row + 1],
            jax.tree.map(lambda x, row=row: x[row : row + 1], p),
            index[row : row + 1],
        )
        assert int(alone[0]) == together[row], row


def test_noise_for_chosen_ids_equals_the_full_draw() -> None:
    keys = jax.vmap(lambda s: jax.random.key_data(row_key(s, jnp.int32(3))))(jnp.arange(3))
    ids = jnp.tile(jnp.arange(VOCAB, dtype=jnp.int32), (3, 1))
    full = sampling.gumbel_noise(keys, ids)
    picked = sampling.gumbel_noise(keys, ids[:, ::-7])
    np.testing.assert_array_equal(picked, full[:, ::-7])
    want = jax.random.gumbel(row_key(jnp.int32(1), jnp.int32(3)), (VOCAB,), jnp.float32)
    np.testing.assert_array_equal(full[1], want)


@pytest.mark.parametrize(
    ("scale", "temperature", "top_k", "top_p"),
    [
        (2.0, 1.0, 0, 0.8),  # a nucleus of 34 tokens, within the candidates
        (0.5, 0.8, 200, 0.6),  # top_k past the candidates, then top-p: the exact fallback
        (1.0, 1.0, 40, 1.0),
    ],
)
def test_sampled_frequencies_match_the_renormalised_distribution(
    scale: float, temperature: float, top_k: int, top_p: float
) -> None:
    rng = np.random.default_rng(11)
    row = (rng.normal(size=VOCAB) * scale).astype(np.float32)
    draws = 6000
    logits = np.broadcast_to(row, (draws, VOCAB))
    p = params(draws, temperature, top_k, top_p)
    p = p._replace(seed=jnp.arange(draws, dtype=jnp.int32))
    tokens = np.asarray(jax.jit(sample)(logits, p, jnp.zeros(draws, jnp.int32)))

    kept, ambiguous = reference_kept(row[None], params(1, temperature, top_k, top_p))
    assert not ambiguous.any()
    kept = kept[0]
    assert kept[tokens].all(), "a token outside the kept set was drawn"
    z = row[kept].astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    counts = np.bincount(tokens, minlength=VOCAB)[kept]
    # Pool the rare tokens so every cell expects at least 5 draws.
    expected = probs * draws
    rare = expected < 5
    observed = np.append(counts[~rare], counts[rare].sum())
    expected = np.append(expected[~rare], expected[rare].sum())
    if observed[-1] == 0 and expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    bound = float(stats.chi2.ppf(1 - 1e-4, df=len(observed) - 1))
    assert chi2 < bound, (chi2, bound, int(kept.sum()))
    assert len(observed) > 10  # a real test of the shape, not of one or two cells
