//! The group arithmetic under the threshold key: points and scalars of edwards25519, polynomials
//! and their commitments (Feldman), Lagrange weights, the two zero-knowledge proofs the
//! redistribution needs (knowledge of a discrete logarithm; equality of two), and the masks that
//! seal a sub-share to its receiver. Every hash is BLAKE3 in derive-key mode under its own context,
//! so no value of one use can be replayed as another.

use super::Proof;
use curve25519::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519::scalar::Scalar;
use curve25519::traits::{Identity, VartimeMultiscalarMul};
use rand_core06::{CryptoRng, RngCore};

pub(crate) const KNOWLEDGE_CONTEXT: &str = "dbqsfs 2026-12 ms key: proof of knowledge";
pub(crate) const SAME_LOG_CONTEXT: &str = "dbqsfs 2026-12 ms key: proof of equal logarithms";
pub(crate) const SEAL_CONTEXT: &str = "dbqsfs 2026-12 ms key: sub-share seal";
pub(crate) const SEAL_KEY_CONTEXT: &str = "dbqsfs 2026-12 ms key: seal key from seed";

/// A point sent by someone else: on the curve, in the prime-order subgroup, not of small order
/// (so not the identity).
pub(crate) fn point(bytes: &[u8; 32]) -> Option<EdwardsPoint> {
    let p = CompressedEdwardsY(*bytes).decompress()?;
    (!p.is_small_order() && p.is_torsion_free()).then_some(p)
}

/// A scalar sent by someone else, in canonical form.
pub(crate) fn scalar(bytes: &[u8; 32]) -> Option<Scalar> {
    Option::from(Scalar::from_canonical_bytes(*bytes))
}

pub(crate) fn bytes(p: &EdwardsPoint) -> [u8; 32] {
    p.compress().to_bytes()
}

/// A member's abscissa: its position in its committee, from 1 (0 is the secret's).
pub(crate) fn abscissa(position: usize) -> Scalar {
    Scalar::from(position as u64 + 1)
}

/// A scalar from the hash of `parts` (each length-prefixed) under `context`.
pub(crate) fn hash_to_scalar(context: &str, parts: &[&[u8]]) -> Scalar {
    let mut h = blake3::Hasher::new_derive_key(context);
    for part in parts {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    let mut wide = [0u8; 64];
    h.finalize_xof().fill(&mut wide);
    Scalar::from_bytes_mod_order_wide(&wide)
}

pub(crate) fn random<R: RngCore + CryptoRng>(rng: &mut R) -> Scalar {
    Scalar::random(rng)
}

/// `p(x)` for the polynomial of coefficients `coefficients` (constant first).
pub(crate) fn evaluate(coefficients: &[Scalar], x: &Scalar) -> Scalar {
    coefficients
        .iter()
        .rev()
        .fold(Scalar::ZERO, |acc, c| acc * x + c)
}

/// `p(x)·G` from the commitments `c_k·G` of `p`'s coefficients.
pub(crate) fn evaluate_in_exponent(commitments: &[EdwardsPoint], x: &Scalar) -> EdwardsPoint {
    commitments
        .iter()
        .rev()
        .fold(EdwardsPoint::identity(), |acc, c| acc * x + c)
}

/// The Lagrange weight of `xs[i]` for interpolating at 0 over the abscissas `xs` (distinct).
pub(crate) fn lagrange_at_zero(xs: &[Scalar], i: usize) -> Scalar {
    let (mut num, mut den) = (Scalar::ONE, Scalar::ONE);
    for (j, xj) in xs.iter().enumerate() {
        if j != i {
            num *= xj;
            den *= xj - xs[i];
        }
    }
    num * den.invert()
}

/// `Σ w_i·P_i`.
pub(crate) fn combine(weights: &[Scalar], points: &[EdwardsPoint]) -> EdwardsPoint {
    EdwardsPoint::vartime_multiscalar_mul(weights, points)
}

/// A proof that the prover knows `a` with `A = a·G`, bound to `binding` (who proves, for what).
pub(crate) fn prove_knowledge<R: RngCore + CryptoRng>(
    binding: &[u8],
    a: &Scalar,
    big_a: &EdwardsPoint,
    rng: &mut R,
) -> Proof {
    let k = random(rng);
    let r = EdwardsPoint::mul_base(&k);
    let c = hash_to_scalar(KNOWLEDGE_CONTEXT, &[binding, &bytes(big_a), &bytes(&r)]);
    Proof {
        c: c.to_bytes(),
        z: (k + c * a).to_bytes(),
    }
}

pub(crate) fn check_knowledge(binding: &[u8], big_a: &EdwardsPoint, proof: &Proof) -> bool {
    let (Some(c), Some(z)) = (scalar(&proof.c), scalar(&proof.z)) else {
        return false;
    };
    let r = EdwardsPoint::mul_base(&z) - big_a * c;
    c == hash_to_scalar(KNOWLEDGE_CONTEXT, &[binding, &bytes(big_a), &bytes(&r)])
}

/// A proof (Chaum–Pedersen) that `P = x·G` and `K = x·R` for the same `x`, bound to `binding`:
/// how a receiver shows the key that opens a sealed sub-share without giving away its own.
pub(crate) fn prove_same_log<R: RngCore + CryptoRng>(
    binding: &[u8],
    x: &Scalar,
    p: &EdwardsPoint,
    r: &EdwardsPoint,
    k: &EdwardsPoint,
    rng: &mut R,
) -> Proof {
    let w = random(rng);
    let (a, b) = (EdwardsPoint::mul_base(&w), r * w);
    let c = same_log_challenge(binding, p, r, k, &a, &b);
    Proof {
        c: c.to_bytes(),
        z: (w + c * x).to_bytes(),
    }
}

pub(crate) fn check_same_log(
    binding: &[u8],
    p: &EdwardsPoint,
    r: &EdwardsPoint,
    k: &EdwardsPoint,
    proof: &Proof,
) -> bool {
    let (Some(c), Some(z)) = (scalar(&proof.c), scalar(&proof.z)) else {
        return false;
    };
    let a = EdwardsPoint::mul_base(&z) - p * c;
    let b = r * z - k * c;
    c == same_log_challenge(binding, p, r, k, &a, &b)
}

fn same_log_challenge(
    binding: &[u8],
    p: &EdwardsPoint,
    r: &EdwardsPoint,
    k: &EdwardsPoint,
    a: &EdwardsPoint,
    b: &EdwardsPoint,
) -> Scalar {
    hash_to_scalar(
        SAME_LOG_CONTEXT,
        &[
            binding,
            &bytes(p),
            &bytes(r),
            &bytes(k),
            &bytes(a),
            &bytes(b),
        ],
    )
}

/// The mask that seals the sub-share of `receiver` from `dealer` in `epoch`'s round, from the
/// Diffie–Hellman key `k` only the two can compute.
pub(crate) fn seal_mask(k: &EdwardsPoint, epoch: u64, dealer: usize, receiver: usize) -> Scalar {
    hash_to_scalar(
        SEAL_CONTEXT,
        &[
            &bytes(k),
            &epoch.to_le_bytes(),
            &(dealer as u64).to_le_bytes(),
            &(receiver as u64).to_le_bytes(),
        ],
    )
}
