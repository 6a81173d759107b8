//! Node metadata in redb: the configuration chain, the epochs ready, transfer progress, arcs
//! collected, blocks deferred for lack of space, and a committee member's agreement state.

use super::*;

impl DiskStore {
    pub(super) fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, StoreError> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(META).map_err(db_err)?;
        let Some(v) = t.get(name).map_err(db_err)? else {
            return Ok(None);
        };
        postcard::from_bytes(v.value())
            .map(Some)
            .map_err(|e| StoreError::Io(format!("metadata {name} is unreadable: {e}")))
    }

    pub(super) fn put_meta<T: serde::Serialize>(
        &self,
        name: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(value).map_err(|e| StoreError::Io(e.to_string()))?;
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(META).map_err(db_err)?;
            t.insert(name, bytes.as_slice()).map_err(db_err)?;
        }
        w.commit().map_err(db_err)
    }

    /// The installed configurations, oldest first, as saved. A store written before
    /// configurations had rows of their own holds the chain as one value: it is moved into rows
    /// here, once.
    pub fn load_chain(&self) -> Result<Option<Vec<CertifiedConfig>>, StoreError> {
        let rows = {
            let r = self.db.begin_read().map_err(db_err)?;
            let t = r.open_table(CHAIN).map_err(db_err)?;
            let mut rows = Vec::new();
            for entry in t.iter().map_err(db_err)? {
                let (epoch, v) = entry.map_err(db_err)?;
                let c: CertifiedConfig = postcard::from_bytes(v.value()).map_err(|e| {
                    StoreError::Io(format!(
                        "the configuration of epoch {} is unreadable ({e}); {}",
                        epoch.value(),
                        crate::files::OLDER_FORMAT
                    ))
                })?;
                rows.push(c);
            }
            rows
        };
        if !rows.is_empty() {
            return Ok(Some(rows));
        }
        let Some(old) = self.get_meta::<Vec<CertifiedConfig>>(META_CHAIN)? else {
            return Ok(None);
        };
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(CHAIN).map_err(db_err)?;
            for c in &old {
                let bytes = postcard::to_stdvec(c).map_err(|e| StoreError::Io(e.to_string()))?;
                t.insert(c.config.epoch, bytes.as_slice()).map_err(db_err)?;
            }
            w.open_table(META)
                .map_err(db_err)?
                .remove(META_CHAIN)
                .map_err(db_err)?;
        }
        w.commit().map_err(db_err)?;
        Ok(Some(old))
    }

    /// Saves configurations the chain gained, one row each (the rows already saved are left as
    /// they are); durable on return.
    pub fn save_configs(&self, configs: &[CertifiedConfig]) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(CHAIN).map_err(db_err)?;
            for c in configs {
                let bytes = postcard::to_stdvec(c).map_err(|e| StoreError::Io(e.to_string()))?;
                t.insert(c.config.epoch, bytes.as_slice()).map_err(db_err)?;
            }
        }
        w.commit().map_err(db_err)
    }

    /// The epochs whose state transfer is complete, as last saved.
    pub fn load_ready(&self) -> Result<Option<Vec<u64>>, StoreError> {
        self.get_meta(META_READY)
    }

    /// Saves the epochs whose state transfer is complete; durable on return.
    pub fn save_ready(&self, epochs: &[u64]) -> Result<(), StoreError> {
        self.put_meta(META_READY, &epochs)
    }

    /// The epoch an older version recorded taking part in the MS agreement of, if any.
    pub fn load_legacy_agreement_epoch(&self) -> Result<Option<u64>, StoreError> {
        self.get_meta(META_LEGACY_AGREEMENT)
    }

    /// The MS agreement record of `epoch` and the batches executed in it (in sequence order,
    /// from 1), as last saved by [`DiskStore::save_agreement`].
    pub fn load_agreement(&self, epoch: u64) -> Result<Option<SavedAgreement>, StoreError> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(MS_AGREEMENT).map_err(db_err)?;
        let Some(record) = t.get(epoch).map_err(db_err)? else {
            return Ok(None);
        };
        let b = r.open_table(MS_BATCHES).map_err(db_err)?;
        let mut batches = Vec::new();
        for entry in b.range((epoch, 0)..=(epoch, u64::MAX)).map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            if k.value().1 != batches.len() as u64 + 1 {
                return Err(StoreError::Io(format!(
                    "the MS batches of epoch {epoch} have a gap at {}",
                    batches.len() + 1
                )));
            }
            batches.push(v.value().to_vec());
        }
        Ok(Some((record.value().to_vec(), batches)))
    }

    /// Replaces the MS agreement record of `epoch`, adds the batches executed since the last save
    /// (`first` is the sequence number of `batches[0]`), and forgets older epochs' records; one
    /// transaction, durable on return.
    pub fn save_agreement(
        &self,
        epoch: u64,
        record: &[u8],
        first: u64,
        batches: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(MS_AGREEMENT).map_err(db_err)?;
            t.retain_in(..epoch, |_, _| false).map_err(db_err)?;
            t.insert(epoch, record).map_err(db_err)?;
            let mut b = w.open_table(MS_BATCHES).map_err(db_err)?;
            b.retain_in(..(epoch, 0), |_, _| false).map_err(db_err)?;
            for (i, batch) in batches.iter().enumerate() {
                b.insert((epoch, first + i as u64), batch.as_slice())
                    .map_err(db_err)?;
            }
        }
        w.commit().map_err(db_err)
    }

    /// The node's shares of the MS key, as last saved by [`DiskStore::save_key_shares`]. A share
    /// that does not read back or match its public side is left out (the node then holds no
    /// share of that sharing, which the MS tolerates as a fault).
    pub fn load_key_shares(&self) -> Result<KeyState, StoreError> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(MS_KEY_SHARES).map_err(db_err)?;
        let mut shares = Vec::new();
        for entry in t.iter().map_err(db_err)? {
            let (_, v) = entry.map_err(db_err)?;
            if let Ok(share) = KeyShare::from_bytes(v.value()) {
                shares.push(share);
            }
        }
        let rounds = self.get_meta(META_KEY_ROUNDS)?.unwrap_or_default();
        Ok(KeyState { shares, rounds })
    }

    /// Replaces the node's shares of the MS key with `shares` (the ones left out are deleted);
    /// durable on return.
    pub fn save_key_shares(&self, state: &KeyState) -> Result<(), StoreError> {
        let shares = &state.shares;
        let rounds =
            postcard::to_stdvec(&state.rounds).map_err(|e| StoreError::Io(e.to_string()))?;
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let mut m = w.open_table(META).map_err(db_err)?;
            m.insert(META_KEY_ROUNDS, rounds.as_slice())
                .map_err(db_err)?;
            let mut t = w.open_table(MS_KEY_SHARES).map_err(db_err)?;
            t.retain(|_, _| false).map_err(db_err)?;
            for share in shares {
                t.insert(share.epoch(), share.to_bytes().as_slice())
                    .map_err(db_err)?;
            }
        }
        w.commit().map_err(db_err)
    }

    /// The arcs whose state transfer is done, per epoch, as persisted by
    /// [`DiskStore::add_transfer_done`].
    pub fn load_transfer_done(&self) -> Result<BTreeMap<u64, Vec<RingArc>>, StoreError> {
        self.load_arcs(TRANSFER_DONE, "transfer progress")
    }

    /// Records that the transfer of `arc` into `epoch` is done; durable on return.
    pub fn add_transfer_done(&self, epoch: u64, arc: RingArc) -> Result<(), StoreError> {
        self.add_arc(TRANSFER_DONE, epoch, arc)
    }

    /// Forgets the per-arc progress of `epoch` (once its whole transfer is recorded complete).
    pub fn clear_transfer_done(&self, epoch: u64) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(TRANSFER_DONE).map_err(db_err)?;
            t.remove(epoch).map_err(db_err)?;
        }
        w.commit().map_err(db_err)
    }

    /// The arcs collected by garbage collection, by the epoch on entering which they were lost
    /// ([`DiskStore::add_gc_collected`]).
    pub fn load_gc_collected(&self) -> Result<BTreeMap<u64, Vec<RingArc>>, StoreError> {
        self.load_arcs(GC_COLLECTED, "garbage collection progress")
    }

    /// Records that `arc`, lost on entering `epoch`, was collected; durable on return.
    pub fn add_gc_collected(&self, epoch: u64, arc: RingArc) -> Result<(), StoreError> {
        self.add_arc(GC_COLLECTED, epoch, arc)
    }

    pub(super) fn load_arcs(
        &self,
        table: TableDefinition<u64, &[u8]>,
        what: &str,
    ) -> Result<BTreeMap<u64, Vec<RingArc>>, StoreError> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(table).map_err(db_err)?;
        let mut out = BTreeMap::new();
        for entry in t.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let arcs: Vec<RingArc> = postcard::from_bytes(v.value())
                .map_err(|e| StoreError::Io(format!("{what} is unreadable: {e}")))?;
            out.insert(k.value(), arcs);
        }
        Ok(out)
    }

    pub(super) fn add_arc(
        &self,
        table: TableDefinition<u64, &[u8]>,
        epoch: u64,
        arc: RingArc,
    ) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(table).map_err(db_err)?;
            let mut arcs: Vec<RingArc> = match t.get(epoch).map_err(db_err)? {
                Some(v) => postcard::from_bytes(v.value()).unwrap_or_default(),
                None => Vec::new(),
            };
            if arcs.contains(&arc) {
                return Ok(());
            }
            arcs.push(arc);
            let bytes = postcard::to_stdvec(&arcs).map_err(|e| StoreError::Io(e.to_string()))?;
            t.insert(epoch, bytes.as_slice()).map_err(db_err)?;
        }
        w.commit().map_err(db_err)
    }

    /// The content blocks deferred for lack of space ([`DiskStore::add_deferred`]).
    pub fn load_deferred(&self) -> Result<Vec<ObjectId>, StoreError> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(DEFERRED).map_err(db_err)?;
        let mut ids = Vec::new();
        for entry in t.iter().map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            if let Ok(arr) = <[u8; 32]>::try_from(k.value()) {
                ids.push(ObjectId(arr));
            }
        }
        Ok(ids)
    }

    /// Records content blocks a transfer could not store for lack of space; durable on return
    /// (from the reserve).
    pub fn add_deferred(&self, ids: &[ObjectId]) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(DEFERRED).map_err(db_err)?;
            for id in ids {
                t.insert(id.0.as_slice(), ()).map_err(db_err)?;
            }
        }
        w.commit().map_err(db_err)
    }

    /// Forgets deferred blocks (stored now, or no longer this node's); durable on return.
    pub fn remove_deferred(&self, ids: &[ObjectId]) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(DEFERRED).map_err(db_err)?;
            for id in ids {
                t.remove(id.0.as_slice()).map_err(db_err)?;
            }
        }
        w.commit().map_err(db_err)
    }
}
