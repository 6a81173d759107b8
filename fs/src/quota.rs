//! A volume's quota: the most bytes its files may hold (the sum of their sizes, what `df`
//! shows as used). One record (`quota`) that anyone with the volume's key may set, read by the
//! writer at open and every few seconds; a write, truncation or allocation that would pass it
//! fails with `EDQUOT`, changing nothing, and freeing space lets writes go on.
//!
//! Non-goals: per-user or per-directory quotas, counting what snapshots keep.

use crate::backend::Backend;
use crate::error::{FsError, FsResult};

/// The record holding a volume's quota.
pub const QUOTA_LABEL: &[u8] = b"quota";
const TAG_QUOTA: u8 = 0x51;

/// The volume's quota (`None`: none).
pub fn read(backend: &dyn Backend) -> FsResult<Option<u64>> {
    let Some(rec) = backend.get_record(QUOTA_LABEL)? else {
        return Ok(None);
    };
    match rec.value.as_slice() {
        [] => Ok(None),
        [TAG_QUOTA, rest @ ..] if rest.len() == 8 => {
            Ok(Some(u64::from_le_bytes(rest.try_into().expect("8 bytes"))))
        }
        _ => Err(FsError::Decode {
            what: "volume quota",
            detail: format!("{} bytes", rec.value.len()),
        }),
    }
}

/// Sets (`Some`) or removes (`None`) the volume's quota.
pub fn set(backend: &dyn Backend, quota: Option<u64>) -> FsResult<()> {
    let version = backend.get_record(QUOTA_LABEL)?.map_or(0, |r| r.version);
    let value = match quota {
        Some(q) => [&[TAG_QUOTA][..], &q.to_le_bytes()].concat(),
        None => Vec::new(),
    };
    Ok(backend.put_record(QUOTA_LABEL, version + 1, &value)?)
}
