//! Which sockets of this process belong to which device, so that a device
//! removal announced on `mlsfed.revoked` wakes only that device's sockets:
//! a broadcast to every socket would wake a hundred thousand tasks for each
//! removal.

use std::sync::Arc;

use proto::DeviceId;
use tokio::sync::Notify;

use crate::keyed::{Keyed, Registered};

/// The sockets of this process by device. Bounded by the sockets
/// (`limits.max_websockets`): each holds one entry, gone with its socket.
#[derive(Default)]
pub struct Removals {
    sockets: Keyed<DeviceId, Arc<Notify>>,
}

/// One socket's registration; dropping it forgets the socket.
pub struct Watch {
    notify: Arc<Notify>,
    _registered: Registered<DeviceId, Arc<Notify>>,
}

impl Removals {
    /// Registers a socket of `device`.
    pub fn watch(&self, device: &DeviceId) -> Watch {
        let notify = Arc::new(Notify::new());
        let registered = self.sockets.insert(device.clone(), notify.clone());
        Watch { notify, _registered: registered }
    }

    /// Tells every socket of `device` here that it was removed.
    pub fn removed(&self, device: &DeviceId) {
        // A stored permit: a socket busy elsewhere sees it next time.
        self.sockets.each(device, |notify| notify.notify_one());
    }
}

impl Watch {
    /// Completes once the device is announced removed.
    pub async fn removed(&self) {
        self.notify.notified().await;
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
        assert!(r.sockets.is_empty(), "a dropped socket stayed registered");
    }
}
