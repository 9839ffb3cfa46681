//! Persistence of the device: the openmls key/value store (MemoryStorage's
//! map, written through to a sled tree after every operation) and the
//! device's own metadata. A write is one sled batch, then a flush, so a
//! killed process resumes from the last completed operation.

use std::path::Path;

use openmls_memory_storage::MemoryStorage;

use crate::{ClientError, Meta};

pub struct Store {
    db: sled::Db,
    mls: sled::Tree,
}

const META: &[u8] = b"meta";

impl Store {
    pub fn open(home: &Path) -> Result<Self, ClientError> {
        let db = sled::open(home.join("device.sled"))?;
        let mls = db.open_tree("openmls")?;
        Ok(Self { db, mls })
    }

    pub fn load_into(&self, storage: &MemoryStorage) -> Result<(), ClientError> {
        let mut map = storage.values.write().map_err(|_| ClientError::Protocol("poisoned store".into()))?;
        for kv in self.mls.iter() {
            let (k, v) = kv?;
            map.insert(k.to_vec(), v.to_vec());
        }
        Ok(())
    }

    pub fn meta(&self) -> Result<Option<Meta>, ClientError> {
        match self.db.get(META)? {
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(|e| ClientError::Protocol(e.to_string())),
            None => Ok(None),
        }
    }

    pub fn save(&self, storage: &MemoryStorage, meta: &Meta) -> Result<(), ClientError> {
        let map = storage.values.read().map_err(|_| ClientError::Protocol("poisoned store".into()))?;
        let mut batch = sled::Batch::default();
        for kv in self.mls.iter() {
            let (k, v) = kv?;
            match map.get(k.as_ref()) {
                None => batch.remove(k),
                Some(nv) if nv.as_slice() != v.as_ref() => batch.insert(k.as_ref(), nv.as_slice()),
                Some(_) => {}
            }
        }
        for (k, v) in map.iter() {
            if !self.mls.contains_key(k)? {
                batch.insert(k.as_slice(), v.as_slice());
            }
        }
        self.mls.apply_batch(batch)?;
        let meta = serde_json::to_vec(meta).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.db.insert(META, meta)?;
        self.db.flush()?;
        Ok(())
    }
}
