//! The JetStream backend, for many keydir processes. Each one-time
//! KeyPackage is one message on its own subject; a claim finds the first
//! message of the device and suite with a direct get and deletes it by
//! sequence, which JetStream does for exactly one caller (design: "atomic
//! claims by CAS"). Small records (last resort, device lists, bindings) live
//! in a KV bucket and are updated by revision.

use std::time::Duration;

use async_nats::jetstream::response::Response;
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, kv, message::PublishMessage, stream};
use bytes::Bytes;
use futures::StreamExt;
use proto::{names, DeviceId, UserId};

use crate::store::{dec, enc, KeyStore, Reservation, Result, StoreError, Stored, Take};

/// CAS attempts on a device list before giving up.
const CAS_RETRIES: usize = 32;

pub struct JsStore {
    js: jetstream::Context,
    stream: stream::Stream,
    kv: kv::Store,
}

fn jse<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::JetStream(e.to_string())
}

impl JsStore {
    /// Opens (creating if needed) the stream and bucket.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Self> {
        let stream = js
            .get_or_create_stream(stream::Config {
                name: names::KEYPACKAGES_STREAM.into(),
                subjects: vec![names::KEYPACKAGES_WILDCARD.into()],
                storage: stream::StorageType::File,
                allow_direct: true,
                duplicate_window: Duration::from_secs(600),
                num_replicas: replicas.max(1),
                ..Default::default()
            })
            .await
            .map_err(jse)?;
        let kv = match js.get_key_value(names::KEYDIR_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => match js
                .create_key_value(kv::Config {
                    bucket: names::KEYDIR_BUCKET.into(),
                    history: 1,
                    num_replicas: replicas.max(1),
                    ..Default::default()
                })
                .await
            {
                Ok(kv) => kv,
                Err(_) => js.get_key_value(names::KEYDIR_BUCKET).await.map_err(jse)?,
            },
        };
        Ok(Self { js: js.clone(), stream, kv })
    }

    async fn publish(&self, subject: String, payload: Vec<u8>, id: Option<String>) -> Result<()> {
        let mut m = PublishMessage::build().payload(Bytes::from(payload));
        if let Some(id) = id {
            m = m.message_id(id);
        }
        self.js.send_publish(subject, m).await.map_err(jse)?.await.map_err(jse)?;
        Ok(())
    }

    /// Deletes message `seq`; `Ok(false)` when another caller deleted it first.
    ///
    /// With `no_erase`: async-nats' `delete_message` asks for a secure
    /// erase, for which nats-server rewrites the message's whole block file
    /// (and fsyncs it) on every delete: 44% of nats-server's time in a
    /// profile of claims. A KeyPackage holds nothing secret; it is handed
    /// to whoever claims it.
    async fn delete(&self, seq: u64) -> Result<bool> {
        #[derive(serde::Deserialize)]
        struct Deleted {
            success: bool,
        }
        let subject = format!("STREAM.MSG.DELETE.{}", names::KEYPACKAGES_STREAM);
        let body = serde_json::json!({ "seq": seq, "no_erase": true });
        match self.js.request::<_, _, Response<Deleted>>(subject, &body).await.map_err(jse)? {
            Response::Ok(d) => Ok(d.success),
            // Another caller deleted it first (JetStream answers with one of
            // these codes depending on timing and storage).
            Response::Err { error }
                if error.error_code() == ErrorCode::NO_MESSAGE_FOUND
                    || error.error_code() == ErrorCode::SEQUENCE_NOT_FOUND
                    || error.error_code() == ErrorCode::STREAM_MESSAGE_DELETE_FAILED =>
            {
                Ok(false)
            }
            Response::Err { error } => Err(jse(error)),
        }
    }

    /// Visits messages on `subject` (may be a wildcard) in order.
    async fn next(&self, subject: &str, from: u64) -> Result<Option<(u64, Bytes)>> {
        match self.stream.direct_get_next_for_subject(subject, Some(from)).await {
            Ok(m) => Ok(Some((m.sequence, m.payload))),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(jse(e)),
        }
    }

    /// Read-modify-write of a user's device list by KV revision.
    async fn edit_devices(&self, u: &UserId, edit: impl Fn(&mut Vec<DeviceId>) -> bool) -> Result<()> {
        let key = names::user_devices_key(u);
        for _ in 0..CAS_RETRIES {
            let entry = self.kv.entry(key.as_str()).await.map_err(jse)?;
            let (mut list, rev): (Vec<DeviceId>, u64) = match &entry {
                Some(e) if !e.value.is_empty() => (dec(&e.value)?, e.revision),
                Some(e) => (Vec::new(), e.revision),
                None => (Vec::new(), 0),
            };
            if !edit(&mut list) {
                return Ok(());
            }
            let value = Bytes::from(enc(&list));
            let written = if rev == 0 {
                self.kv
                    .create(key.as_str(), value)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.kind() == kv::CreateErrorKind::AlreadyExists)
            } else {
                self.kv
                    .update(key.as_str(), value, rev)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.kind() == kv::UpdateErrorKind::WrongLastRevision)
            };
            match written {
                Ok(()) => return Ok(()),
                Err(true) => continue,
                Err(false) => return Err(StoreError::JetStream("cannot write device list".into())),
            }
        }
        Err(StoreError::JetStream("device list contended".into()))
    }
}

impl KeyStore for JsStore {
    async fn put_one_time(&self, d: &DeviceId, s: &Stored) -> Result<()> {
        self.publish(
            names::key_package_subject(d, s.suite, &s.kp_ref),
            enc(s),
            Some(names::key_package_msg_id(&s.kp_ref)),
        )
        .await
    }

    async fn put_last_resort(&self, d: &DeviceId, s: &Stored) -> Result<()> {
        self.kv.put(names::last_resort_key(d, s.suite), Bytes::from(enc(s))).await.map_err(jse)?;
        Ok(())
    }

    async fn last_resort(&self, d: &DeviceId, suite: u16) -> Result<Option<Stored>> {
        match self.kv.get(names::last_resort_key(d, suite)).await.map_err(jse)? {
            Some(v) if !v.is_empty() => Ok(Some(dec(&v)?)),
            _ => Ok(None),
        }
    }

    async fn take_one_time(
        &self,
        d: &DeviceId,
        suite: u16,
        now: u64,
        accept: &(dyn Fn(&Stored) -> bool + Sync),
        claimer: &DeviceId,
    ) -> Result<Take> {
        let subject = names::key_packages_of(d, suite);
        let mut from = 1;
        let mut saw_any = false;
        while let Some((seq, payload)) = self.next(&subject, from).await? {
            from = seq + 1;
            let s: Stored = dec(&payload)?;
            if s.not_after <= now {
                self.delete(seq).await?;
                continue;
            }
            saw_any = true;
            if !accept(&s) {
                continue;
            }
            // Reserve first, then take: a crash in between leaves it both in
            // the pool and reserved, and the release finds it still pooled
            // (never lost, never pooled twice).
            let r = Reservation { device: d.clone(), claimer: claimer.clone(), at: now, stored: s.clone() };
            self.put_reservation(&r).await?;
            if self.delete(seq).await? {
                return Ok(Take::Taken(s));
            }
            // Another claimer won it; one reservation for it remains.
            self.take_reservation(&s.kp_ref).await?;
        }
        Ok(if saw_any { Take::NoneCompatible } else { Take::Empty })
    }

    async fn put_back(&self, d: &DeviceId, s: &Stored, return_id: &str) -> Result<()> {
        // An id of its own: not the upload's (whose dedup would drop the
        // return), but one per reservation, so two processes releasing the
        // same reservation at once put it back once.
        self.publish(names::key_package_subject(d, s.suite, &s.kp_ref), enc(s), Some(return_id.to_owned())).await
    }

    async fn has_one_time(&self, d: &DeviceId, s: &Stored) -> Result<bool> {
        match self.stream.direct_get_last_for_subject(names::key_package_subject(d, s.suite, &s.kp_ref)).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(false),
            Err(e) => Err(jse(e)),
        }
    }

    async fn count_one_time(&self, d: &DeviceId, suite: u16) -> Result<usize> {
        let mut info = self.stream.info_with_subjects(names::key_packages_of(d, suite)).await.map_err(jse)?;
        let mut n = 0;
        while let Some(item) = info.next().await {
            n += item.map_err(jse)?.1;
        }
        Ok(n)
    }

    async fn count_up_to(&self, d: &DeviceId, suite: u16, limit: usize) -> Result<usize> {
        // Batched direct gets of at most `limit` in all (one round trip for
        // the usual low-water mark), instead of listing every subject or
        // one direct get per KeyPackage: every claim asks this.
        let subject = names::key_packages_of(d, suite);
        let client = self.js.client();
        let (mut from, mut n) = (1, 0);
        while n < limit {
            let want = (limit - n).min(proto::direct::MAX_BATCH);
            let got = proto::direct::batch(
                &client,
                names::KEYPACKAGES_STREAM,
                &subject,
                from,
                want,
                None,
                Duration::from_secs(5),
            )
            .await
            .map_err(jse)?;
            n += got.len();
            match got.last() {
                Some(last) if got.len() == want => from = last.seq + 1,
                _ => break,
            }
        }
        Ok(n.min(limit))
    }

    async fn sweep(&self, d: &DeviceId, suite: u16, now: u64) -> Result<usize> {
        let subject = names::key_packages_of(d, suite);
        let (mut from, mut n) = (1, 0);
        while let Some((seq, payload)) = self.next(&subject, from).await? {
            from = seq + 1;
            if dec::<Stored>(&payload)?.not_after <= now && self.delete(seq).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn add_device(&self, u: &UserId, d: &DeviceId) -> Result<()> {
        self.edit_devices(u, |list| {
            if list.contains(d) {
                return false;
            }
            list.push(d.clone());
            true
        })
        .await
    }

    async fn devices(&self, u: &UserId) -> Result<Vec<DeviceId>> {
        match self.kv.get(names::user_devices_key(u)).await.map_err(jse)? {
            Some(v) if !v.is_empty() => dec(&v),
            _ => Ok(Vec::new()),
        }
    }

    async fn remove_device(&self, d: &DeviceId, suites: &[u16]) -> Result<()> {
        self.edit_devices(&d.user(), |list| {
            let before = list.len();
            list.retain(|x| x != d);
            list.len() != before
        })
        .await?;
        for suite in suites {
            self.stream.purge().filter(names::key_packages_of(d, *suite)).await.map_err(jse)?;
            self.kv.delete(names::last_resort_key(d, *suite)).await.map_err(jse)?;
        }
        Ok(())
    }

    async fn put_reservation(&self, r: &Reservation) -> Result<()> {
        self.publish(names::reservation_subject(&r.stored.kp_ref), enc(r), None).await
    }

    async fn take_reservation(&self, kp_ref: &[u8]) -> Result<Option<Reservation>> {
        let m = match self.stream.direct_get_last_for_subject(names::reservation_subject(kp_ref)).await {
            Ok(m) => m,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(jse(e)),
        };
        if self.delete(m.sequence).await? {
            Ok(Some(dec(&m.payload)?))
        } else {
            Ok(None)
        }
    }

    async fn reservations_before(&self, before: u64) -> Result<Vec<Reservation>> {
        let mut out = Vec::new();
        let mut from = 1;
        while let Some((seq, payload)) = self.next(names::RESERVATIONS_WILDCARD, from).await? {
            from = seq + 1;
            let r: Reservation = dec(&payload)?;
            if r.at <= before {
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn put_binding(&self, d: &DeviceId, signed: &[u8]) -> Result<()> {
        self.kv.put(names::binding_key(d), Bytes::copy_from_slice(signed)).await.map_err(jse)?;
        Ok(())
    }

    async fn put_revoked(&self, d: &DeviceId) -> Result<()> {
        self.kv.put(names::revoked_key(d), Bytes::from_static(&[1])).await.map_err(jse)?;
        Ok(())
    }

    async fn is_revoked(&self, d: &DeviceId) -> Result<bool> {
        Ok(self.kv.get(names::revoked_key(d)).await.map_err(jse)?.is_some_and(|v| !v.is_empty()))
    }

    async fn binding(&self, d: &DeviceId) -> Result<Option<Vec<u8>>> {
        Ok(self.kv.get(names::binding_key(d)).await.map_err(jse)?.filter(|v| !v.is_empty()).map(|v| v.to_vec()))
    }
}
