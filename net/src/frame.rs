//! Framing: `u32` little-endian length, then that many bytes.
//!
//! The length comes from an untrusted peer, so it is checked against the limit
//! before anything is allocated, and what is held grows only as bytes actually
//! arrive (a peer that claims 2 MiB and sends nothing costs us almost nothing).
//!
//! Bulk data is copied once on each side: a sent frame's body is handed to the
//! stream without a copy ([`Bytes`]), and a received one is kept as the chunks
//! the stream gives until it is whole, then joined.

use bytes::Bytes;
use quinn::{ReadExactError, RecvStream, SendStream};

use crate::NetError;

/// Bytes of the length header in front of each frame.
pub const HEADER_LEN: usize = 4;

/// Reads one frame of at most `max` bytes.
///
/// Returns `Ok(None)` when the stream finished cleanly before a new frame
/// started, [`NetError::Truncated`] when it finished inside one, and
/// [`NetError::FrameTooLarge`] when the header claims more than `max` bytes.
pub async fn read_frame(recv: &mut RecvStream, max: u32) -> Result<Option<Vec<u8>>, NetError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(ReadExactError::FinishedEarly(_)) => return Err(NetError::Truncated),
        Err(ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let claimed = u32::from_le_bytes(header);
    if claimed > max {
        return Err(NetError::FrameTooLarge {
            len: u64::from(claimed),
            max,
        });
    }
    // `claimed <= max <= u32::MAX`, which fits in usize on every supported target.
    let len = usize::try_from(claimed).map_err(|_| NetError::FrameTooLarge {
        len: u64::from(claimed),
        max,
    })?;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut got = 0;
    while got < len {
        let chunk = recv
            .read_chunk(len - got, true)
            .await?
            .ok_or(NetError::Truncated)?;
        got += chunk.bytes.len();
        chunks.push(chunk.bytes);
    }
    let mut body = Vec::with_capacity(len);
    for c in &chunks {
        body.extend_from_slice(c);
    }
    Ok(Some(body))
}

/// Writes one frame; refuses messages longer than `max`. The body is queued on
/// the stream as it is (no copy).
pub async fn write_frame(send: &mut SendStream, msg: Bytes, max: u32) -> Result<(), NetError> {
    let len = check_len(msg.len(), max)?;
    let mut parts = [Bytes::copy_from_slice(&len.to_le_bytes()), msg];
    send.write_all_chunks(&mut parts).await?;
    Ok(())
}

/// The frame header value for a message of `len` bytes, if within `max`.
pub(crate) fn check_len(len: usize, max: u32) -> Result<u32, NetError> {
    match u32::try_from(len) {
        Ok(l) if l <= max => Ok(l),
        _ => Err(NetError::FrameTooLarge {
            len: u64::try_from(len).unwrap_or(u64::MAX),
            max,
        }),
    }
}
