//! A bounded, in-memory record of recent issuances for `GET /api/v1/certificates`.

use parking_lot::Mutex;
use std::collections::VecDeque;

use serde::Serialize;
use time::OffsetDateTime;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    pub identity: String,
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// The authenticated caller: a SPIFFE ID or `node:NAME`.
    pub requester: String,
    /// `grpc` or `rest`.
    pub via: &'static str,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
}

/// Keeps the newest `capacity` entries; older ones fall off, so memory stays
/// flat however many certificates are issued.
pub struct AuditLog {
    capacity: usize,
    entries: Mutex<VecDeque<AuditEntry>>,
}

impl AuditLog {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: Mutex::new(VecDeque::with_capacity(capacity.clamp(1, 4096))),
        }
    }

    pub fn record(&self, entry: AuditEntry) {
        let mut entries = self.entries.lock();
        if entries.len() == self.capacity {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    /// Newest first.
    pub fn recent(&self, limit: usize) -> Vec<AuditEntry> {
        let entries = self.entries.lock();
        entries.iter().rev().take(limit).cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_newest_entries() {
        let log = AuditLog::new(3);
        for i in 0..10 {
            log.record(AuditEntry {
                identity: format!("id-{i}"),
                serial: String::new(),
                not_before: OffsetDateTime::UNIX_EPOCH,
                not_after: OffsetDateTime::UNIX_EPOCH,
                requester: String::new(),
                via: "rest",
                issued_at: OffsetDateTime::UNIX_EPOCH,
            });
        }
        let ids: Vec<_> = log.recent(10).into_iter().map(|e| e.identity).collect();
        assert_eq!(ids, ["id-9", "id-8", "id-7"]);
    }
}
