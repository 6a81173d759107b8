//! Transport errors.

use quinn::{ConnectionError, ReadError, WriteError};

use crate::codes;

/// Everything that can go wrong in the transport.
///
/// Errors caused by the remote side (bad frames, resets, lost connections) are
/// ordinary values: nothing that arrives from the network panics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// Connecting (handshake included) took longer than the connect timeout.
    #[error("timed out while connecting")]
    ConnectTimeout,
    /// The request got no (next) response frame within the request timeout.
    #[error("request timed out")]
    Timeout,
    /// The peer authenticated but refused to authorize our node key.
    #[error("peer refused our node key")]
    Unauthorized,
    /// The peer at the address presented a key other than the pinned one.
    #[error("peer presented a different node key than the one pinned")]
    WrongPeerKey,
    /// The TLS/QUIC handshake failed for another reason.
    #[error("handshake failed: {0}")]
    Handshake(ConnectionError),
    /// The connection could not even be started (bad address, endpoint stopped, ...).
    #[error("cannot connect: {0}")]
    Connect(quinn::ConnectError),
    /// The connection was closed or lost.
    #[error("connection lost: {0}")]
    ConnectionLost(ConnectionError),
    /// A frame length exceeds the limit (ours, or the one we send under).
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// The length claimed by the frame header or of the message to send.
        len: u64,
        /// The configured limit.
        max: u32,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The peer closed the stream without answering.
    #[error("peer closed the stream without a response")]
    NoResponse,
    /// The peer aborted the stream (reset or stop) with an application code.
    ///
    /// See [`codes`] for the codes this crate uses.
    #[error("peer aborted the stream with code {code}")]
    StreamAborted {
        /// The application error code the peer gave.
        code: u64,
    },
    /// The stream was already closed locally.
    #[error("stream already closed")]
    StreamClosed,
    /// This endpoint was closed.
    #[error("endpoint closed")]
    EndpointClosed,
    /// Building the TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Socket-level failure (bind, ...).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl NetError {
    /// Classifies a connection-level failure, recognising our authorization refusal.
    pub(crate) fn from_connection(e: ConnectionError) -> Self {
        match &e {
            ConnectionError::ApplicationClosed(close)
                if close.error_code.into_inner() == u64::from(codes::CLOSE_UNAUTHORIZED) =>
            {
                NetError::Unauthorized
            }
            _ => NetError::ConnectionLost(e),
        }
    }
}

impl From<ReadError> for NetError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Reset(code) => NetError::StreamAborted {
                code: code.into_inner(),
            },
            ReadError::ConnectionLost(e) => NetError::from_connection(e),
            ReadError::ClosedStream
            | ReadError::IllegalOrderedRead
            | ReadError::ZeroRttRejected => NetError::StreamClosed,
        }
    }
}

impl From<WriteError> for NetError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Stopped(code) => NetError::StreamAborted {
                code: code.into_inner(),
            },
            WriteError::ConnectionLost(e) => NetError::from_connection(e),
            WriteError::ClosedStream | WriteError::ZeroRttRejected => NetError::StreamClosed,
        }
    }
}

impl From<quinn::ClosedStream> for NetError {
    fn from(_: quinn::ClosedStream) -> Self {
        NetError::StreamClosed
    }
}
