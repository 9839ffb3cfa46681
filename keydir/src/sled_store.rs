//! The embedded backend: sled trees in the operator's data directory. One
//! process only (sled locks its directory).

use proto::{DeviceId, UserId};

use crate::store::{dec, enc, KeyStore, Reservation, Result, StoreError, Stored, Take};

pub struct SledStore {
    db: sled::Db,
    one_time: sled::Tree,
    last_resort: sled::Tree,
    devices: sled::Tree,
    reservations: sled::Tree,
    bindings: sled::Tree,
    revoked: sled::Tree,
}

fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::new();
    for p in parts {
        k.extend_from_slice(&(p.len() as u16).to_be_bytes());
        k.extend_from_slice(p);
    }
    k
}

impl SledStore {
    pub fn open(db: &sled::Db) -> Result<Self> {
        Ok(Self {
            db: db.clone(),
            one_time: db.open_tree("kp_one_time")?,
            last_resort: db.open_tree("kp_last_resort")?,
            devices: db.open_tree("kp_devices")?,
            reservations: db.open_tree("kp_reservations")?,
            bindings: db.open_tree("identity_bindings")?,
            revoked: db.open_tree("revoked_devices")?,
        })
    }
}

impl SledStore {
    /// A claim or an upload is answered only once it is on disk: a crash
    /// must not let a claimed KeyPackage be served again.
    async fn durable(&self) -> Result<()> {
        // flush_async can stall under many concurrent callers; a plain
        // flush on the blocking pool does not.
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Corrupt(format!("flush task failed: {e}")))??;
        Ok(())
    }
}

impl KeyStore for SledStore {
    async fn put_one_time(&self, d: &DeviceId, s: &Stored) -> Result<()> {
        self.one_time.insert(key(&[d.as_bytes(), &s.suite.to_be_bytes(), &s.kp_ref]), enc(s))?;
        self.durable().await
    }

    async fn put_last_resort(&self, d: &DeviceId, s: &Stored) -> Result<()> {
        self.last_resort.insert(key(&[d.as_bytes(), &s.suite.to_be_bytes()]), enc(s))?;
        self.durable().await
    }

    async fn last_resort(&self, d: &DeviceId, suite: u16) -> Result<Option<Stored>> {
        self.last_resort.get(key(&[d.as_bytes(), &suite.to_be_bytes()]))?.map(|v| dec(&v)).transpose()
    }

    async fn take_one_time(
        &self,
        d: &DeviceId,
        suite: u16,
        now: u64,
        accept: &(dyn Fn(&Stored) -> bool + Sync),
        claimer: &DeviceId,
    ) -> Result<Take> {
        use sled::Transactional;
        let mut saw_any = false;
        for item in self.one_time.scan_prefix(key(&[d.as_bytes(), &suite.to_be_bytes()])) {
            let (k, v) = item?;
            let s: Stored = dec(&v)?;
            if s.not_after <= now {
                self.one_time.remove(&k)?;
                continue;
            }
            saw_any = true;
            if !accept(&s) {
                continue;
            }
            // One transaction moves it from the pool to the reservations:
            // of concurrent claimers only one finds it, and a crash leaves it
            // in exactly one of the two.
            let r = enc(&Reservation { device: d.clone(), claimer: claimer.clone(), at: now, stored: s.clone() });
            let moved = (&self.one_time, &self.reservations)
                .transaction(|(ot, rs)| {
                    if ot.remove(k.as_ref())?.is_none() {
                        return Ok(false);
                    }
                    rs.insert(s.kp_ref.as_slice(), r.as_slice())?;
                    Ok(true)
                })
                .map_err(|e: sled::transaction::TransactionError<()>| match e {
                    sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                    sled::transaction::TransactionError::Abort(()) => StoreError::Corrupt("aborted".into()),
                })?;
            if moved {
                self.durable().await?;
                return Ok(Take::Taken(s));
            }
        }
        Ok(if saw_any { Take::NoneCompatible } else { Take::Empty })
    }

    async fn has_one_time(&self, d: &DeviceId, s: &Stored) -> Result<bool> {
        Ok(self.one_time.contains_key(key(&[d.as_bytes(), &s.suite.to_be_bytes(), &s.kp_ref]))?)
    }

    async fn count_one_time(&self, d: &DeviceId, suite: u16) -> Result<usize> {
        Ok(self.one_time.scan_prefix(key(&[d.as_bytes(), &suite.to_be_bytes()])).count())
    }

    async fn sweep(&self, d: &DeviceId, suite: u16, now: u64) -> Result<usize> {
        let mut n = 0;
        for item in self.one_time.scan_prefix(key(&[d.as_bytes(), &suite.to_be_bytes()])) {
            let (k, v) = item?;
            if dec::<Stored>(&v)?.not_after <= now && self.one_time.remove(&k)?.is_some() {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn add_device(&self, u: &UserId, d: &DeviceId) -> Result<()> {
        self.devices.insert(key(&[u.as_bytes(), d.as_bytes()]), &[])?;
        self.durable().await
    }

    async fn devices(&self, u: &UserId) -> Result<Vec<DeviceId>> {
        let prefix = key(&[u.as_bytes()]);
        let mut out = Vec::new();
        for item in self.devices.scan_prefix(&prefix) {
            let (k, _) = item?;
            // The device part follows the user part and its 2-byte length.
            if let Some(rest) = k.get(prefix.len() + 2..) {
                if let Ok(d) = DeviceId::from_credential_identity(rest) {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    async fn remove_device(&self, d: &DeviceId, suites: &[u16]) -> Result<()> {
        self.devices.remove(key(&[d.user().as_bytes(), d.as_bytes()]))?;
        for suite in suites {
            for item in self.one_time.scan_prefix(key(&[d.as_bytes(), &suite.to_be_bytes()])) {
                self.one_time.remove(item?.0)?;
            }
            self.last_resort.remove(key(&[d.as_bytes(), &suite.to_be_bytes()]))?;
        }
        self.durable().await
    }

    async fn put_reservation(&self, r: &Reservation) -> Result<()> {
        self.reservations.insert(&r.stored.kp_ref, enc(r))?;
        self.durable().await
    }

    async fn take_reservation(&self, kp_ref: &[u8]) -> Result<Option<Reservation>> {
        let r = self.reservations.remove(kp_ref)?.map(|v| dec(&v)).transpose()?;
        if r.is_some() {
            self.durable().await?;
        }
        Ok(r)
    }

    async fn reservations_before(&self, before: u64) -> Result<Vec<Reservation>> {
        let mut out = Vec::new();
        for item in self.reservations.iter() {
            let r: Reservation = dec(&item?.1)?;
            if r.at <= before {
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn put_binding(&self, d: &DeviceId, signed: &[u8]) -> Result<()> {
        self.bindings.insert(d.as_bytes(), signed)?;
        self.durable().await
    }

    async fn binding(&self, d: &DeviceId) -> Result<Option<Vec<u8>>> {
        Ok(self.bindings.get(d.as_bytes())?.map(|v| v.to_vec()))
    }

    async fn put_revoked(&self, d: &DeviceId) -> Result<()> {
        self.revoked.insert(d.as_bytes(), &[1u8][..])?;
        self.durable().await
    }

    async fn is_revoked(&self, d: &DeviceId) -> Result<bool> {
        Ok(self.revoked.contains_key(d.as_bytes())?)
    }
}
