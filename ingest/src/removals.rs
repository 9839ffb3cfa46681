//! Which sockets of this process belong to which device, so that a device
//! removal announced on `mlsfed.revoked` wakes only that device's sockets:
//! a broadcast to every socket would wake a hundred thousand tasks for each
//! removal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use proto::DeviceId;
use tokio::sync::Notify;

type Registered = Arc<Mutex<HashMap<DeviceId, Vec<(u64, Arc<Notify>)>>>>;

/// The sockets of this process by device. Bounded by the sockets
/// (`limits.max_websockets`): each holds one entry, gone with its socket.
#[derive(Default)]
pub struct Removals {
    sockets: Registered,
    next: AtomicU64,
}

/// One socket's registration; dropping it forgets the socket.
pub struct Watch {
    device: DeviceId,
    token: u64,
    notify: Arc<Notify>,
    sockets: Registered,
}

impl Removals {
    /// Registers a socket of `device`.
    pub fn watch(&self, device: &DeviceId) -> Watch {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        if let Ok(mut s) = self.sockets.lock() {
            s.entry(device.clone()).or_default().push((token, notify.clone()));
        }
        Watch { device: device.clone(), token, notify, sockets: self.sockets.clone() }
    }

    /// Tells every socket of `device` here that it was removed.
    pub fn removed(&self, device: &DeviceId) {
        let Ok(s) = self.sockets.lock() else { return };
        for (_, notify) in s.get(device).into_iter().flatten() {
            // A stored permit: a socket busy elsewhere sees it next time.
            notify.notify_one();
        }
    }
}

impl Watch {
    /// Completes once the device is announced removed.
    pub async fn removed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Ok(mut s) = self.sockets.lock() {
            if let Some(list) = s.get_mut(&self.device) {
                list.retain(|(t, _)| *t != self.token);
                if list.is_empty() {
                    s.remove(&self.device);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_removed_devices_sockets_hear_it_and_none_stays_registered() {
        let r = Removals::default();
        let a = DeviceId::parse("mimi://a.example/d/alice/one").unwrap();
        let b = DeviceId::parse("mimi://a.example/d/bob/one").unwrap();
        let (a1, a2, b1) = (r.watch(&a), r.watch(&a), r.watch(&b));
        r.removed(&a);
        // Both of alice's sockets hear it, even though neither was waiting.
        a1.removed().await;
        a2.removed().await;
        let heard = tokio::time::timeout(std::time::Duration::from_millis(50), b1.removed()).await;
        assert!(heard.is_err(), "bob's socket heard alice's removal");
        drop((a1, a2, b1));
        assert!(r.sockets.lock().unwrap().is_empty(), "a dropped socket stayed registered");
    }
}
