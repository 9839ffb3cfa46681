//! Values registered under a key by tasks that come and go: the submit
//! handlers waiting for one verdict, the sockets of one device. Each
//! registration is forgotten when its guard drops, so the map never holds
//! more than the tasks alive.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

struct Inner<K, V> {
    map: Mutex<HashMap<K, Vec<(u64, V)>>>,
    /// Tells apart the registrations under one key.
    next: AtomicU64,
}

/// A shared map from a key to the values registered under it.
pub struct Keyed<K, V>(Arc<Inner<K, V>>);

impl<K, V> Clone for Keyed<K, V> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<K, V> Default for Keyed<K, V> {
    fn default() -> Self {
        Self(Arc::new(Inner { map: Mutex::new(HashMap::new()), next: AtomicU64::new(0) }))
    }
}

/// One registration; dropping it removes it, and only it.
pub struct Registered<K: Hash + Eq, V> {
    key: K,
    token: u64,
    keyed: Keyed<K, V>,
}

impl<K: Hash + Eq + Clone, V> Keyed<K, V> {
    /// Registers `value` under `key` until the guard drops.
    pub fn insert(&self, key: K, value: V) -> Registered<K, V> {
        let token = self.0.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut map) = self.0.map.lock() {
            map.entry(key.clone()).or_default().push((token, value));
        }
        Registered { key, token, keyed: self.clone() }
    }

    /// Removes and returns every value under `key`.
    pub fn take<Q>(&self, key: &Q) -> Vec<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let taken = self.0.map.lock().ok().and_then(|mut map| map.remove(key)).unwrap_or_default();
        taken.into_iter().map(|(_, v)| v).collect()
    }

    /// Calls `f` on every value under `key`, leaving them registered.
    pub fn each(&self, key: &K, mut f: impl FnMut(&V)) {
        if let Ok(map) = self.0.map.lock() {
            for (_, v) in map.get(key).into_iter().flatten() {
                f(v);
            }
        }
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.0.map.lock().map(|m| m.is_empty()).unwrap_or(true)
    }
}

impl<K: Hash + Eq, V> Drop for Registered<K, V> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.keyed.0.map.lock() {
            if let Some(list) = map.get_mut(&self.key) {
                list.retain(|(t, _)| *t != self.token);
                if list.is_empty() {
                    map.remove(&self.key);
                }
            }
        }
    }
}
