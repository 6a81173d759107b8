//! TLS 1.3 with RFC 7250 raw public keys: every peer is its ed25519 node key.
//!
//! The "certificate" a peer presents is the 44-byte SubjectPublicKeyInfo of its
//! node key; nothing else is accepted (no X.509, no chains). The handshake
//! signature is checked with `ed25519_dalek::VerifyingKey::verify_strict`, the
//! one Ed25519 acceptance rule of dbqsfs.
//!
//! * The dialler pins the exact key it means to reach ([`PinnedServerKey`]).
//! * The acceptor accepts any well-formed ed25519 key ([`AnyClientKey`]); the
//!   handshake proves possession, and authorization happens afterwards, in
//!   [`crate::Endpoint`].
//!
//! Session resumption and 0-RTT are disabled: every connection does a full
//! handshake, so every connection proves the peer's key afresh and no request
//! can be replayed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{AlwaysResolvesClientRawPublicKeys, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{AlwaysResolvesServerRawPublicKeys, NoServerSessionStorage};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError,
    PeerIncompatible, SignatureAlgorithm, SignatureScheme,
};

use crate::ALPN;

/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410): the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Length of an ed25519 SubjectPublicKeyInfo in DER.
const ED25519_SPKI_LEN: usize = ED25519_SPKI_PREFIX.len() + 32;

/// The SubjectPublicKeyInfo (DER) a node presents as its raw public key.
pub fn key_to_spki(key: &VerifyingKey) -> Vec<u8> {
    let mut spki = Vec::with_capacity(ED25519_SPKI_LEN);
    spki.extend_from_slice(&ED25519_SPKI_PREFIX);
    spki.extend_from_slice(key.as_bytes());
    spki
}

/// Parses an ed25519 SubjectPublicKeyInfo, as presented in an RFC 7250 handshake.
///
/// Only the single DER encoding of an ed25519 key is accepted; anything else
/// (other algorithms, trailing bytes, a byte string that is not a curve point)
/// yields `None`.
pub fn spki_to_key(spki: &[u8]) -> Option<VerifyingKey> {
    let raw = spki.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    let raw: &[u8; 32] = raw.try_into().ok()?;
    VerifyingKey::from_bytes(raw).ok()
}

/// The authenticated node key of the peer of an established connection.
///
/// `None` only if the connection carries no raw public key, which cannot
/// happen for connections made by this crate (both sides require one).
pub fn peer_key(conn: &quinn::Connection) -> Option<VerifyingKey> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    match certs.as_slice() {
        [only] => spki_to_key(only.as_ref()),
        _ => None,
    }
}

/// The TLS signing key: the node's ed25519 key, signing with dalek.
struct NodeKey {
    key: Arc<SigningKey>,
    spki: Vec<u8>,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret half.
        f.debug_struct("NodeKey")
            .field("public", &self.key.verifying_key())
            .finish_non_exhaustive()
    }
}

impl rustls::sign::SigningKey for NodeKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&SignatureScheme::ED25519)
            .then(|| Box::new(NodeSigner(self.key.clone())) as Box<dyn rustls::sign::Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ED25519
    }
}

struct NodeSigner(Arc<SigningKey>);

impl std::fmt::Debug for NodeSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSigner").finish_non_exhaustive()
    }
}

impl rustls::sign::Signer for NodeSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, TlsError> {
        Ok(self.0.sign(message).to_bytes().to_vec())
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// Our own identity, ready for rustls's raw-public-key resolvers.
pub(crate) fn certified_key(key: &SigningKey) -> Arc<CertifiedKey> {
    let spki = key_to_spki(&key.verifying_key());
    let cert = CertificateDer::from(spki.clone());
    let signer = NodeKey {
        key: Arc::new(key.clone()),
        spki,
    };
    Arc::new(CertifiedKey::new(vec![cert], Arc::new(signer)))
}

/// Checks a TLS 1.3 handshake signature made by the key in `spki`.
fn verify_handshake_signature(
    message: &[u8],
    spki: &[u8],
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, TlsError> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(TlsError::PeerIncompatible(
            PeerIncompatible::NoSignatureSchemesInCommon,
        ));
    }
    let key =
        spki_to_key(spki).ok_or(TlsError::InvalidCertificate(CertificateError::BadEncoding))?;
    let signature = Signature::from_slice(dss.signature())
        .map_err(|_| TlsError::InvalidCertificate(CertificateError::BadSignature))?;
    key.verify_strict(message, &signature)
        .map_err(|_| TlsError::InvalidCertificate(CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

/// TLS 1.2 never runs (the configs are TLS 1.3 only); refuse it outright.
fn refuse_tls12() -> Result<HandshakeSignatureValid, TlsError> {
    Err(TlsError::PeerIncompatible(
        PeerIncompatible::Tls13RequiredForQuic,
    ))
}

/// Client side: accepts exactly one server key.
///
/// `mismatch` is raised when the server presented another key, so the dialler
/// can report [`crate::NetError::WrongPeerKey`] instead of a generic handshake
/// failure.
#[derive(Debug)]
struct PinnedServerKey {
    expected_spki: Vec<u8>,
    mismatch: Arc<AtomicBool>,
}

impl ServerCertVerifier for PinnedServerKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        if intermediates.is_empty() && end_entity.as_ref() == self.expected_spki.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            self.mismatch.store(true, Ordering::Release);
            Err(TlsError::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_handshake_signature(message, cert.as_ref(), dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// Server side: accepts any well-formed ed25519 client key.
///
/// Possession is proven by the handshake signature; whether the key may talk to
/// us is the [`crate::Authorizer`]'s decision, taken after the handshake.
#[derive(Debug)]
struct AnyClientKey;

impl ClientCertVerifier for AnyClientKey {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        if intermediates.is_empty() && spki_to_key(end_entity.as_ref()).is_some() {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(TlsError::InvalidCertificate(CertificateError::BadEncoding))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_handshake_signature(message, cert.as_ref(), dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// rustls client config for one dial: pins `expected`, presents `ours`.
pub(crate) fn client_config(
    ours: Arc<CertifiedKey>,
    expected: &VerifyingKey,
    mismatch: Arc<AtomicBool>,
) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = PinnedServerKey {
        expected_spki: key_to_spki(expected),
        mismatch,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(AlwaysResolvesClientRawPublicKeys::new(ours)));
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    config.enable_early_data = false;
    Ok(config)
}

/// rustls server config: presents `ours`, accepts any ed25519 client key.
pub(crate) fn server_config(ours: Arc<CertifiedKey>) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyClientKey))
        .with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(ours)));
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_round_trips_and_matches_rustls_encoding() {
        let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
        let spki = key_to_spki(&key);
        let by_rustls =
            rustls::sign::public_key_to_spki(&rustls::pki_types::alg_id::ED25519, key.as_bytes());
        assert_eq!(spki.as_slice(), by_rustls.as_ref());
        assert_eq!(spki_to_key(&spki), Some(key));
    }

    #[test]
    fn spki_parser_rejects_anything_else() {
        let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
        let spki = key_to_spki(&key);
        assert_eq!(spki_to_key(&spki[..spki.len() - 1]), None);
        let mut longer = spki.clone();
        longer.push(0);
        assert_eq!(spki_to_key(&longer), None);
        let mut other_alg = spki.clone();
        other_alg[8] = 0x71; // Ed448's OID ends in 0x71.
        assert_eq!(spki_to_key(&other_alg), None);
        assert_eq!(spki_to_key(&[]), None);
    }
}
