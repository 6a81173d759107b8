//! Content blocks as files: hash-named paths, written through a temporary file and fsync'd, the
//! in-memory ordered index of their ids, and the free space and reserve of their filesystem.

use super::*;

impl DiskStore {
    pub(super) fn index(&self) -> MutexGuard<'_, BTreeSet<ObjectId>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn block_path(&self, id: &ObjectId) -> (PathBuf, PathBuf, PathBuf) {
        let hex = id.to_hex();
        let a = self.blocks.join(&hex[0..2]);
        let b = a.join(&hex[2..4]);
        let file = b.join(&hex);
        (a, b, file)
    }

    /// Visits every content block file as (id, length).
    pub(super) fn walk_blocks(&self, visit: &mut dyn FnMut(ObjectId, u64)) -> io::Result<()> {
        for a in fs::read_dir(&self.blocks)? {
            let a = a?;
            if a.path() == self.tmp || !a.file_type()?.is_dir() {
                continue;
            }
            for b in fs::read_dir(a.path())? {
                let b = b?;
                if !b.file_type()?.is_dir() {
                    continue;
                }
                for f in fs::read_dir(b.path())? {
                    let f = f?;
                    let name = f.file_name();
                    if let Some(id) = name.to_str().and_then(ObjectId::from_hex) {
                        visit(id, f.metadata()?.len());
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn write_block(&self, id: &ObjectId, data: &[u8]) -> io::Result<bool> {
        let (a, b, file) = self.block_path(id);
        let existed = file.exists();
        ensure_dir(&self.blocks, &a)?;
        ensure_dir(&a, &b)?;
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .tmp
            .join(format!("{}.{}.{seq}", id.to_hex(), std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            drop(f);
            {
                let mut index = self.index();
                fs::rename(&tmp, &file)?;
                index.insert(*id);
            }
            fsync_dir(&b)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| !existed)
    }

    /// Removes content block `id`'s file; returns whether it existed.
    pub(super) fn delete_block_file(&self, id: &ObjectId) -> Result<bool, StoreError> {
        let (_, b, file) = self.block_path(id);
        let len = fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        let removed = {
            let mut index = self.index();
            let removed = fs::remove_file(&file);
            if removed.is_ok() {
                index.remove(id);
            }
            removed
        };
        match removed {
            Ok(()) => {
                fsync_dir(&b).map_err(io_err)?;
                self.content_bytes.fetch_sub(len, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(e)),
        }
    }

    /// The size of content block `id` if this store holds it, without reading it: a block file
    /// exists only once written whole and fsync'd (temporary file, then rename), and every block
    /// is verified against its id before it is written, so what exists is what was verified.
    /// (Decay on the disk after that is caught when the block is read: [`Store::get_content`].)
    pub fn content_len(&self, id: &ObjectId) -> Result<Option<u64>, StoreError> {
        let (_, _, file) = self.block_path(id);
        match fs::metadata(&file) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(e)),
        }
    }

    /// Total bytes of content blocks held (approximate under concurrent writes of one block).
    pub fn content_bytes(&self) -> u64 {
        self.content_bytes.load(Ordering::Relaxed)
    }

    /// Keeps `bytes` free on the filesystem for metadata: content blocks are refused below it.
    pub fn set_reserve(&self, bytes: u64) {
        self.reserve.store(bytes, Ordering::Relaxed);
    }

    /// (bytes free for this process, size) of the store's filesystem.
    pub(super) fn statvfs(&self) -> io::Result<(u64, u64)> {
        let st = rustix::fs::statvfs(&self.blocks).map_err(io::Error::from)?;
        let unit = st.f_frsize.max(1);
        Ok((
            st.f_bavail.saturating_mul(unit),
            st.f_blocks.saturating_mul(unit),
        ))
    }

    /// The store's free space and reserve now.
    pub fn space(&self) -> io::Result<Space> {
        let (free, size) = self.statvfs()?;
        Ok(Space {
            free,
            size,
            reserve: self.reserve.load(Ordering::Relaxed),
        })
    }

    /// Whether `len` more bytes of content fit above the reserve. The store is *full* from the first
    /// refusal until a block of the largest size fits twice over again (so that small blocks that
    /// still fit do not make it flap); it logs when it becomes full and when it stops being full.
    pub(super) fn room_for(&self, len: u64) -> Result<(), StoreError> {
        let space = self.space().map_err(io_err)?;
        let fits = space.free >= space.reserve.saturating_add(len);
        let roomy = space.free >= space.reserve.saturating_add(2 * MAX_BLOCK as u64);
        let was_full = self.full.load(Ordering::Relaxed);
        if !fits {
            self.full.store(true, Ordering::Relaxed);
        } else if roomy {
            self.full.store(false, Ordering::Relaxed);
        }
        if !fits && !was_full {
            warn!(
                dir = %self.blocks.display(),
                free_mb = space.free >> 20,
                reserve_mb = space.reserve >> 20,
                "store full: new content blocks are refused until space is freed on this \
                 filesystem (public-key blocks and metadata go on, from the reserve)"
            );
        } else if roomy && was_full {
            info!(
                free_mb = space.free >> 20,
                "store no longer full: content blocks are stored again"
            );
        }
        if fits {
            Ok(())
        } else {
            Err(StoreError::NoSpace)
        }
    }

    /// Whether the store is full: a block of the largest size would not fit above the reserve, or
    /// it did not lately and has not got room for two since ([`DiskStore::room_for`]).
    pub fn is_full(&self) -> bool {
        self.room_for(MAX_BLOCK as u64).is_err() || self.full.load(Ordering::Relaxed)
    }
}
