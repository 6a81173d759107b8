//! QUIC request/response transport for dbqsfs, with peers authenticated by
//! their ed25519 node keys.
//!
//! # Goals
//! - Carry opaque messages of up to [`MAX_FRAME`] bytes (sized for 1 MiB
//!   blocks plus headers) between nodes: one request and its response per
//!   bidirectional QUIC stream, many requests in flight per connection.
//! - Authenticate both ends by node key with TLS 1.3 and RFC 7250 raw public
//!   keys (no X.509, no certificate authority). The dialler pins the exact key
//!   it means to reach; the acceptor learns the dialler's key from the
//!   handshake and asks the caller's [`Authorizer`] whether to serve it.
//! - Bound everything a peer can make us spend: frame length (checked before
//!   allocating), concurrent streams per connection, time per request. Peers
//!   the [`Authorizer`] does not trust (strangers) share a small budget of their
//!   own ([`StrangerLimits`]): connections, streams, bytes buffered for requests
//!   still arriving, and a short deadline to deliver a request, so strangers can
//!   cost at most a fixed amount of memory however many they are.
//! - Reuse one connection per (peer key, address) and re-dial it transparently.
//!
//! # Non-goals
//! - Knowing the protocol: messages are bytes; encoding, versioning and
//!   signatures belong to the callers.
//! - Retrying requests, choosing peers, quorums: a request that may have been
//!   delivered is never re-sent; callers decide.
//! - NAT traversal, discovery, relays, 0-RTT, session resumption.
//!
//! # Fault model
//! A peer may be anyone, including a Byzantine replica or a stranger on the
//! network. The transport guarantees only that a response came from the holder
//! of the pinned key, and that a request came from the key given to the
//! handler, over an encrypted, integrity-protected channel. The bytes
//! themselves are untrusted: callers authorize (via [`Authorizer`]) and decode
//! them. Nothing a peer sends can make this crate panic or allocate more than
//! the configured limits; misbehaviour shows up as a [`NetError`] for that
//! request or stream, and the endpoint keeps serving others.
//!
//! # Wire format
//! ALPN [`ALPN`]. On each bidirectional stream the dialler writes one frame
//! (`u32` little-endian length, then the bytes) and finishes its side; the
//! acceptor writes zero or more frames and finishes. Zero frames means "no
//! answer"; [`Endpoint::request`] reads one frame, [`Endpoint::request_stream`]
//! reads them all. Streams are aborted with the application [`codes`].

#![warn(missing_docs)]

mod endpoint;
mod error;
pub mod frame;
mod tls;

pub use endpoint::{
    local_bind_for, Authorizer, Endpoint, Handler, Responder, ResponseStream, StrangerLimits,
    TransportOptions,
};
pub use error::NetError;
pub use tls::{key_to_spki, peer_key, spki_to_key};

/// The ALPN protocol identifier of dbqsfs's transport.
pub const ALPN: &[u8] = b"dbqs/1";

/// Default limit on a frame: a 2 MiB payload plus 64 KiB of headers.
pub const MAX_FRAME: u32 = 2 * 1024 * 1024 + 64 * 1024;

/// Application error codes on the wire.
///
/// Connection codes close a whole connection; stream codes abort one request
/// (a peer sees them as [`NetError::StreamAborted`]).
pub mod codes {
    /// Connection: orderly shutdown of an endpoint.
    pub const CLOSE_SHUTDOWN: u32 = 0;
    /// Connection: the acceptor does not authorize the dialler's key
    /// (the dialler sees [`crate::NetError::Unauthorized`]).
    pub const CLOSE_UNAUTHORIZED: u32 = 1;
    /// Connection: a request on it timed out, so the dialler suspects the peer died (for example
    /// killed without closing) and dials afresh next time.
    pub const CLOSE_SUSPECT: u32 = 2;
    /// Connection: the acceptor already holds as many connections from untrusted keys as it
    /// allows (see [`crate::StrangerLimits`]); try again later.
    pub const CLOSE_BUSY: u32 = 3;

    /// Stream: the request was cancelled (timeout, or the requester left).
    pub const STREAM_CANCELLED: u32 = 0x10;
    /// Stream: a frame header claimed more than the receiver's limit.
    pub const STREAM_FRAME_TOO_LARGE: u32 = 0x11;
    /// Stream: the request was malformed (e.g. truncated frame).
    pub const STREAM_BAD_REQUEST: u32 = 0x12;
    /// Stream: the handler failed while writing its response.
    pub const STREAM_HANDLER_FAILED: u32 = 0x13;
    /// Stream: an untrusted peer's request waited too long for a receiving slot, or was not
    /// received within the untrusted peers' deadline.
    pub const STREAM_BUSY: u32 = 0x14;
}
