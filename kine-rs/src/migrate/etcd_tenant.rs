//! A migration source that reads a **tenant of kine-rs's etcd proxy** (`crate::etcd_proxy`):
//! `--from etcd://HOST:PORT[,HOST:PORT] --tenant NAME [--etcd-tenant-prefix TEMPLATE]`.
//!
//! * **Keys** are the tenant's as its clients see them: the tenant's prefix (`/NAME/` by
//!   default) is stripped, exactly as the proxy strips it.
//! * **Revisions** are the shared etcd's, kept as they are (sparse within one tenant).
//! * **History**: the copy starts at the tenant's own compaction revision (the proxy's
//!   `compacted` record; etcd's own compaction revision when that is higher or the tenant
//!   never compacted), so the target answers reads and watches from every revision the proxy
//!   did. A **pin record** (`/_kine-rs/pinned/NAME`) holds that revision while the copy
//!   runs: the proxy compacts the shared etcd up to the lowest tenant compaction and pin
//!   ([`crate::etcd_proxy::compact_shared`]), so the history the copy still needs stays. The
//!   tenant's own Compact still works meanwhile (its record moves; only the physical
//!   compaction waits). The pin is written only if the tenant's compaction record is
//!   unchanged since it was read, so no compaction decided before the pin passes it either.
//!   Something else compacting the etcd (etcd's `--auto-compaction-*`, another tool) is not
//!   held: the copy then stops with "compacted" and a rerun starts over.
//! * **Freeze**: the proxy's own freeze record (`/_kine-rs/frozen/NAME`): every write
//!   transaction of every kine-rs proxy compares on it, so once it is written etcd itself
//!   refuses the tenant's writes, through any proxy. Leases are etcd's: the proxies that
//!   have the tenant open renew them while it is frozen, but one expiring in the freeze
//!   window anyway (no proxy open, or before a proxy saw the freeze), or revoked by a
//!   request that passed the proxy's check first (a lease of 100+ keys), is a change after
//!   the freeze point: it is looked for before the switch and aborts it, the tenant
//!   unfrozen, as for a plain etcd prefix.
//! * **Moved**: once the target serves, `/_kine-rs/moved/NAME` names it; the tenant stays
//!   frozen (and cannot be unfrozen), proxies no longer open it (a sidecar serving it stops,
//!   as a database-backed one does), and its keys stay until `kine-rs tenant delete`.
//! * **Leases**: the tenant's ownership records (`/_kine-rs/leases/NAME/…`), each lease with
//!   its remaining TTL read at the switch.
//! * **The target's revision** at the switch is the shared etcd's revision then, not the
//!   tenant's last write: the proxy answered the tenant's reads with etcd's header revision
//!   (other tenants' writes advance it), so a client may hold a resourceVersion past the
//!   tenant's last write, and the target must not hand out revisions at or below it.

use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use kine_proto::etcdserverpb::request_op::Request;
use kine_proto::etcdserverpb::{RangeRequest, RequestOp, TxnRequest};

use crate::error::{KineError, Result};
use crate::etcd_proxy::prefix::PrefixTemplate;
use crate::etcd_proxy::quota::decode_quota;
use crate::etcd_proxy::{
    Control, PinRecord, absent, delete_op, get_op, lease_id_of, mod_revision_is, parse_number,
    present, put_op, range_at, upstream_error,
};
use crate::model::{Event, KeyValue, LeaseRecord, Revision, now_ms};
use crate::storage::Quota;

use super::MigrateError;
use super::etcd_keys::{EtcdKeys, EtcdSourceError};
use super::source::{Source, SourceState};

/// How often `pin` tries again when the tenant compacts while it pins.
const PIN_ATTEMPTS: usize = 5;

/// A tenant of the etcd proxy, read as a migration source.
pub struct EtcdTenantSource {
    keys: EtcdKeys,
    tenant: String,
    control: Control,
    /// The tenant's bytes, summed once (they only feed the plan and progress).
    bytes: Mutex<Option<i64>>,
}

/// The tenant's records, read together with etcd's revision.
struct Records {
    revision: Revision,
    keys: i64,
    frozen: bool,
    /// The tenant's compaction revision (-1 when none) and its record's mod revision.
    compacted: Revision,
    compacted_mod: Revision,
    quota: Quota,
    /// The migration's pin and its record's mod revision.
    pin: Option<(PinRecord, Revision)>,
    moved: bool,
}

impl EtcdTenantSource {
    /// Connects to the etcd at `endpoint` and checks that the proxy (with the tenant prefix
    /// `template`) has tenant `tenant`.
    pub async fn open(
        endpoint: &str,
        template: &str,
        tenant: &str,
    ) -> Result<Self, EtcdSourceError> {
        let template = PrefixTemplate::parse(template).map_err(EtcdSourceError::BadTemplate)?;
        let prefix = template
            .tenant(tenant)
            .map_err(|e| EtcdSourceError::Endpoint(format!("--tenant: {e}")))?;
        let control = Control::of(&template);
        let source = EtcdTenantSource {
            keys: EtcdKeys::new(endpoint, prefix.prefix().clone(), prefix.prefix().clone())?,
            tenant: tenant.to_string(),
            control,
            bytes: Mutex::new(None),
        };
        source.keys.reachable().await?;
        let registry = source.control.registry(tenant);
        let registered = source
            .keys
            .upstream
            .kv
            .clone()
            .range(RangeRequest {
                key: registry.clone(),
                count_only: true,
                ..Default::default()
            })
            .await
            .map_err(|e| EtcdSourceError::Unreachable {
                endpoint: source.keys.endpoint.clone(),
                reason: upstream_error(e).to_string(),
            })?
            .into_inner()
            .count;
        if registered == 0 {
            return Err(EtcdSourceError::UnknownTenant {
                tenant: tenant.to_string(),
                endpoint: source.keys.endpoint.clone(),
                record: String::from_utf8_lossy(&registry).to_string(),
            });
        }
        Ok(source)
    }

    async fn records(&self) -> Result<Records> {
        let (start, end) = self.keys.range();
        let response = self
            .keys
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare: vec![],
                success: vec![
                    RequestOp {
                        request: Some(Request::RequestRange(RangeRequest {
                            key: start,
                            range_end: end,
                            count_only: true,
                            ..Default::default()
                        })),
                    },
                    get_op(self.control.frozen(&self.tenant)),
                    get_op(self.control.compacted(&self.tenant)),
                    get_op(self.control.quota(&self.tenant)),
                    get_op(self.control.pinned(&self.tenant)),
                    get_op(self.control.moved(&self.tenant)),
                ],
                failure: vec![],
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        let first = |index| range_at(&response.responses, index).and_then(|r| r.kvs.first());
        let compacted = first(2);
        let pin = match first(4) {
            Some(kv) => Some((
                PinRecord::decode(&kv.value).ok_or_else(|| {
                    KineError::Storage(format!(
                        "the migration's pin of tenant {:?} cannot be read: {:?}",
                        self.tenant,
                        String::from_utf8_lossy(&kv.value)
                    ))
                })?,
                kv.mod_revision,
            )),
            None => None,
        };
        Ok(Records {
            revision: response.header.map_or(0, |h| h.revision),
            keys: range_at(&response.responses, 0).map_or(0, |r| r.count),
            frozen: first(1).is_some(),
            compacted: compacted.map_or(-1, |kv| parse_number(&kv.value)),
            compacted_mod: compacted.map_or(0, |kv| kv.mod_revision),
            quota: first(3).map_or(Quota::default(), |kv| decode_quota(&kv.value)),
            pin,
            moved: first(5).is_some(),
        })
    }

    async fn txn(&self, request: TxnRequest) -> Result<bool> {
        Ok(self
            .keys
            .upstream
            .kv
            .clone()
            .txn(request)
            .await
            .map_err(upstream_error)?
            .into_inner()
            .succeeded)
    }
}

#[async_trait]
impl Source for EtcdTenantSource {
    fn describe(&self) -> String {
        format!(
            "tenant {:?} of the etcd proxy at {} (keys under {})",
            self.tenant,
            self.keys.endpoint,
            self.keys.shown()
        )
    }

    async fn state(&self) -> Result<SourceState> {
        let records = self.records().await?;
        let cached = *self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = match cached {
            Some(bytes) => bytes,
            None => {
                let bytes = self.keys.bytes_at(records.revision).await?;
                *self.bytes.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
                bytes
            }
        };
        Ok(SourceState {
            revision: records.revision,
            compact_revision: records.compacted,
            keys: records.keys,
            bytes,
            frozen: records.frozen,
            // etcd's leases are renewed, not paused, while the tenant is frozen: the TTLs
            // read at the switch are what is left, no pause to add.
            frozen_at_ms: 0,
            moved: records.moved,
            pinned: records.pin.is_some(),
            quota: records.quota,
        })
    }

    async fn recover(&self) -> Result<()> {
        let records = self.records().await?;
        if let Some((pin, seen)) = records.pin
            && pin.froze
            && !records.moved
        {
            let pin_key = self.control.pinned(&self.tenant);
            let kept = PinRecord {
                froze: false,
                ..pin
            };
            self.txn(TxnRequest {
                compare: vec![mod_revision_is(pin_key.clone(), seen)],
                success: vec![
                    delete_op(self.control.frozen(&self.tenant), Bytes::new()),
                    put_op(pin_key, kept.encode(), 0),
                ],
                failure: vec![],
            })
            .await?;
        }
        Ok(())
    }

    async fn pin(&self, target: &str) -> Result<Revision> {
        for _ in 0..PIN_ATTEMPTS {
            let records = self.records().await?;
            if records.moved {
                return Err(KineError::TenantMoved {
                    tenant: self.tenant.clone(),
                });
            }
            let physical = self.keys.compact_revision(records.revision).await?;
            let snapshot = records.compacted.max(physical).max(1);
            let pin = PinRecord {
                revision: snapshot,
                target: target.to_string(),
                froze: false,
            };
            // Only while the tenant's compaction record is the one read: a compaction
            // decided from the records before the pin then stops at or below `snapshot`.
            let pinned = self
                .txn(TxnRequest {
                    compare: vec![
                        mod_revision_is(
                            self.control.compacted(&self.tenant),
                            records.compacted_mod,
                        ),
                        absent(self.control.moved(&self.tenant)),
                        present(self.control.registry(&self.tenant)),
                    ],
                    success: vec![put_op(self.control.pinned(&self.tenant), pin.encode(), 0)],
                    failure: vec![],
                })
                .await?;
            if pinned {
                return Ok(snapshot);
            }
        }
        Err(KineError::Unavailable(format!(
            "tenant {:?} kept compacting (or was deleted) while the migration pinned its history",
            self.tenant
        )))
    }

    async fn can_resume(&self, snapshot: Revision) -> Result<bool> {
        let records = self.records().await?;
        let pinned = records.pin.is_some_and(|(pin, _)| pin.revision == snapshot);
        Ok(pinned && self.keys.readable_at(snapshot).await?)
    }

    async fn page(
        &self,
        revision: Revision,
        after: Option<&[u8]>,
        limit: i64,
    ) -> Result<Vec<KeyValue>> {
        self.keys.page(revision, after, limit).await
    }

    async fn events(&self, after: Revision, up_to: Revision) -> Result<Vec<Event>> {
        self.keys.events(after, up_to).await
    }

    async fn leases(&self) -> Result<Vec<LeaseRecord>> {
        let (ids, _) = self
            .keys
            .upstream
            .keys_under(&self.control.leases(&self.tenant))
            .await?;
        let mut leases = Vec::new();
        for id in ids.iter().filter_map(|hex| lease_id_of(hex)) {
            if let Some((lease, _)) = self.keys.lease(id).await? {
                leases.push(lease);
            }
        }
        leases.sort_by_key(|lease| lease.id);
        Ok(leases)
    }

    async fn freeze(&self, target: &str) -> Result<SourceState> {
        let records = self.records().await?;
        let Some((pin, seen)) = records.pin else {
            return Err(KineError::Storage(format!(
                "tenant {:?} lost the migration's pin before the freeze (aborted by another \
                 run?)",
                self.tenant
            )));
        };
        let frozen_key = self.control.frozen(&self.tenant);
        let pin_key = self.control.pinned(&self.tenant);
        let froze = PinRecord {
            target: target.to_string(),
            froze: true,
            ..pin.clone()
        };
        // The proxy's own freeze: etcd orders it with every guarded write of every proxy.
        let response = self
            .keys
            .upstream
            .kv
            .clone()
            .txn(TxnRequest {
                compare: vec![absent(frozen_key.clone()), mod_revision_is(pin_key, seen)],
                success: vec![
                    put_op(frozen_key.clone(), now_ms().to_string(), 0),
                    put_op(self.control.pinned(&self.tenant), froze.encode(), 0),
                ],
                failure: vec![get_op(frozen_key)],
            })
            .await
            .map_err(upstream_error)?
            .into_inner();
        let frozen_by_someone = range_at(&response.responses, 0).is_some_and(|r| !r.kvs.is_empty());
        if !response.succeeded && !frozen_by_someone {
            return Err(KineError::Unavailable(format!(
                "the migration's pin of tenant {:?} changed while it froze the tenant (another \
                 run?)",
                self.tenant
            )));
        }
        // Frozen already (by hand, or by a concurrent request): left frozen if this fails.
        self.state().await
    }

    async fn check_frozen(
        &self,
        final_revision: Revision,
    ) -> std::result::Result<(), MigrateError> {
        match self
            .keys
            .first_change_after(final_revision)
            .await
            .map_err(MigrateError::Source)?
        {
            Some(what) => Err(MigrateError::SourceWritten {
                final_revision,
                what,
            }),
            None => Ok(()),
        }
    }

    async fn switch_revision(&self, final_revision: Revision) -> Result<Revision> {
        // The module's comment: every header revision the proxy answered the tenant with.
        let (now, _) = self.keys.count(0).await?;
        Ok(now.max(final_revision))
    }

    async fn release(&self, keep_pin: bool) -> Result<()> {
        let records = self.records().await?;
        if records.moved {
            return Ok(());
        }
        let Some((pin, _)) = records.pin else {
            return Ok(());
        };
        let mut ops = Vec::new();
        if pin.froze {
            ops.push(delete_op(self.control.frozen(&self.tenant), Bytes::new()));
        }
        let pin_key = self.control.pinned(&self.tenant);
        if keep_pin {
            let kept = PinRecord {
                froze: false,
                ..pin
            };
            ops.push(put_op(pin_key, kept.encode(), 0));
        } else {
            ops.push(delete_op(pin_key, Bytes::new()));
        }
        self.txn(TxnRequest {
            compare: vec![],
            success: ops,
            failure: vec![],
        })
        .await?;
        Ok(())
    }

    async fn mark_moved(&self, target: &str) -> Result<()> {
        // Frozen for good (the freeze record stays), named moved, the pin dropped: the shared
        // etcd's compaction goes on.
        let frozen = self.control.frozen(&self.tenant);
        let moved = vec![
            put_op(self.control.moved(&self.tenant), target.to_string(), 0),
            delete_op(self.control.pinned(&self.tenant), Bytes::new()),
        ];
        let mut refreeze = moved.clone();
        refreeze.push(put_op(frozen.clone(), now_ms().to_string(), 0));
        self.txn(TxnRequest {
            compare: vec![present(frozen)],
            success: moved,
            // Unfrozen by hand since the freeze: nothing was written (checked), frozen again.
            failure: refreeze,
        })
        .await?;
        Ok(())
    }
}
