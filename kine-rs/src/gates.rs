//! One async gate per key: work on one key (opening a tenant, a keyspace) runs one at a time,
//! while work on different keys runs side by side. A gateway restarting under a thousand
//! reconnecting apiservers opens a thousand tenants at once; one gate for the process made
//! each wait for every other's round trips.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Gates by key, forgotten once nobody holds or awaits them.
pub struct Gates<K> {
    gates: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K: Eq + Hash + Clone> Default for Gates<K> {
    fn default() -> Self {
        Gates {
            gates: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone> Gates<K> {
    /// Runs `work` holding `key`'s gate.
    pub async fn run<T>(&self, key: &K, work: impl Future<Output = T>) -> T {
        let gate = self.lock().entry(key.clone()).or_default().clone();
        let result = {
            let _held = gate.lock().await;
            work.await
        };
        let mut gates = self.lock();
        // The map's reference and ours: nobody else waits for this gate. Clones are only
        // taken under the map's lock, so the count cannot grow while it is held.
        if Arc::strong_count(&gate) == 2 {
            gates.remove(key);
        }
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<tokio::sync::Mutex<()>>>> {
        self.gates.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn different_keys_run_side_by_side_and_one_key_in_turn() {
        let gates = Arc::new(Gates::<&'static str>::default());
        let (entered, mut entered_rx) = tokio::sync::mpsc::unbounded_channel();
        let (release, _) = tokio::sync::broadcast::channel::<()>(1);
        let holder = |name: &'static str, tag: u32| {
            let gates = gates.clone();
            let entered = entered.clone();
            let mut released = release.subscribe();
            tokio::spawn(async move {
                gates
                    .run(&name, async {
                        let _ = entered.send(tag);
                        let _ = released.recv().await;
                    })
                    .await
            })
        };
        let enters = async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<u32>| {
            tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .ok()
                .flatten()
        };
        let a = holder("a", 1);
        assert_eq!(enters(&mut entered_rx).await, Some(1));
        // "b" enters while "a" is held; a second "a" does not.
        let b = holder("b", 2);
        assert_eq!(enters(&mut entered_rx).await, Some(2), "b waited for a");
        let a_again = holder("a", 3);
        let waited = tokio::time::timeout(Duration::from_millis(200), entered_rx.recv()).await;
        assert!(
            waited.is_err(),
            "a second holder of one key entered: {waited:?}"
        );
        release.send(()).expect("holders listen");
        assert_eq!(enters(&mut entered_rx).await, Some(3));
        for task in [a, b, a_again] {
            task.await.expect("holder");
        }
        assert!(gates.lock().is_empty(), "gates are forgotten once free");
    }
}
