//! Signing with the threshold key: FROST's two rounds (RFC 9591, `frost-ed25519`) over the shares
//! of [`super::Transcript`]. A member commits to nonces (round one), then signs the package of
//! `threshold` commitments and the message (round two); the aggregator combines the signature
//! shares, checking each against the member's public verifying share, and names the members
//! whose shares are wrong so it can ask others. The result is an ordinary ed25519 signature under
//! [`super::PublicShares::group_key`], checked by [`verify`] alone.

use super::{KeyError, KeyShare, PointBytes, PublicShares};
use crate::crypto::NodeId;
use frost_ed25519 as frost;
pub use frost_ed25519::round1::{SigningCommitments, SigningNonces};
pub use frost_ed25519::round2::SignatureShare;
pub use frost_ed25519::{Identifier, SigningPackage};
use rand_core06::{CryptoRng, RngCore};
use std::collections::BTreeMap;

/// The FROST identifier of the member at `position` of its committee: its abscissa.
pub fn identifier(position: usize) -> Identifier {
    let x = u16::try_from(position + 1).expect("committees are far smaller than 65535");
    Identifier::try_from(x).expect("a nonzero identifier")
}

fn signing_share(share: &KeyShare) -> frost::keys::SigningShare {
    frost::keys::SigningShare::deserialize(&share.secret.to_bytes()).expect("a canonical scalar")
}

/// Round one: fresh nonces (kept by the signer, used once) and their public commitments.
pub fn commit<R: RngCore + CryptoRng>(
    share: &KeyShare,
    rng: &mut R,
) -> (SigningNonces, SigningCommitments) {
    frost::round1::commit(&signing_share(share), rng)
}

/// Round two: my signature share over `package` with the nonces of my commitment in it.
pub fn sign(
    share: &KeyShare,
    package: &SigningPackage,
    nonces: &SigningNonces,
) -> Result<SignatureShare, KeyError> {
    let public = &share.public;
    let verifying = public
        .verifying_share(share.position)
        .ok_or(KeyError::NoShare)?;
    let key_package = frost::keys::KeyPackage::new(
        identifier(share.position),
        signing_share(share),
        frost::keys::VerifyingShare::deserialize(&verifying).map_err(|_| KeyError::NoShare)?,
        frost::VerifyingKey::deserialize(&public.group_key()).map_err(|_| KeyError::NoShare)?,
        public.threshold() as u16,
    );
    frost::round2::sign(package, nonces, &key_package).map_err(|_| KeyError::NoShare)
}

/// Why an aggregation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AggregateError {
    #[error("the signature shares of {0:?} do not verify")]
    Culprits(Vec<NodeId>),
    #[error("the signing package or the shares are malformed: {0}")]
    Malformed(String),
}

/// Combines the signature shares of the members who committed in `package` into one ed25519
/// signature under the key of `public`, or names every member whose share is wrong.
pub fn aggregate(
    public: &PublicShares,
    package: &SigningPackage,
    shares: &BTreeMap<Identifier, SignatureShare>,
) -> Result<[u8; 64], AggregateError> {
    let mut verifying = BTreeMap::new();
    let mut members = BTreeMap::new();
    let images = public
        .verifying_shares()
        .ok_or_else(|| AggregateError::Malformed("the public shares".into()))?;
    for (position, (member, share)) in public.members.iter().zip(&images).enumerate() {
        let share = frost::keys::VerifyingShare::deserialize(share)
            .map_err(|e| AggregateError::Malformed(e.to_string()))?;
        verifying.insert(identifier(position), share);
        members.insert(identifier(position), *member);
    }
    let key = frost::VerifyingKey::deserialize(&public.group_key())
        .map_err(|e| AggregateError::Malformed(e.to_string()))?;
    let package_public =
        frost::keys::PublicKeyPackage::new(verifying, key, Some(public.threshold() as u16));
    match frost::aggregate_custom(
        package,
        shares,
        &package_public,
        frost::CheaterDetection::AllCheaters,
    ) {
        Ok(sig) => {
            let bytes = sig
                .serialize()
                .map_err(|e| AggregateError::Malformed(e.to_string()))?;
            bytes
                .try_into()
                .map_err(|_| AggregateError::Malformed("signature length".into()))
        }
        Err(frost::Error::InvalidSignatureShare { culprits }) => Err(AggregateError::Culprits(
            culprits
                .iter()
                .filter_map(|c| members.get(c).copied())
                .collect(),
        )),
        Err(e) => Err(AggregateError::Malformed(e.to_string())),
    }
}

/// Checks `sig` over `msg` under the MS key: one ed25519 verification (`verify_strict`).
pub fn verify(key: &PointBytes, msg: &[u8], sig: &[u8; 64]) -> bool {
    ed25519_dalek::VerifyingKey::from_bytes(key)
        .and_then(|vk| vk.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(sig)))
        .is_ok()
}
