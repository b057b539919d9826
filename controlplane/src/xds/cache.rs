//! The server's current set of resources and a bounded log of what changed.
//!
//! The cache holds every resource once, already encoded ([`Encoded`]), plus
//! an index from IP address to the Address resources that answer to it.
//! Every change gets a generation number and a line in the change log;
//! streams remember the last generation they caught up with and read the
//! log from there. The log is bounded: a stream that falls further behind
//! than the log reaches is told so and reconciles against the whole cache
//! instead, so no per-update state ever accumulates for a slow client.
//!
//! The cache does no I/O and takes no locks itself; the server wraps it in
//! one `RwLock` whose critical sections are short and never span an await.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::resource::{Encoded, Kind, NetIp};

/// One line of the change log.
#[derive(Debug)]
pub(crate) struct Change {
    pub generation: u64,
    pub kind: Kind,
    pub name: Arc<str>,
}

#[derive(Debug)]
pub(crate) struct Cache {
    generation: u64,
    resources: [HashMap<Arc<str>, Arc<Encoded>>; 2],
    by_ip: HashMap<NetIp, Vec<Arc<str>>>,
    log: VecDeque<Change>,
    log_capacity: usize,
    /// Changes up to and including this generation may have been dropped
    /// from the log.
    truncated_through: u64,
}

impl Cache {
    pub(crate) fn new(log_capacity: usize) -> Self {
        Self {
            generation: 0,
            resources: Default::default(),
            by_ip: HashMap::new(),
            log: VecDeque::new(),
            log_capacity: log_capacity.max(1),
            truncated_through: 0,
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn get(&self, kind: Kind, name: &str) -> Option<&Arc<Encoded>> {
        self.resources[kind.index()].get(name)
    }

    pub(crate) fn len(&self, kind: Kind) -> usize {
        self.resources[kind.index()].len()
    }

    pub(crate) fn entries(&self, kind: Kind) -> impl Iterator<Item = &Arc<Encoded>> {
        self.resources[kind.index()].values()
    }

    /// How many changes the log keeps: the configured size, or twice the
    /// number of resources if that is more.
    pub(crate) fn log_capacity(&self) -> usize {
        let resources: usize = self.resources.iter().map(HashMap::len).sum();
        self.log_capacity.max(2 * resources)
    }

    /// Names of the Address resources (workloads by their IPs, services by
    /// their VIPs) that answer to `ip`.
    pub(crate) fn lookup_ip(&self, ip: &NetIp) -> &[Arc<str>] {
        self.by_ip.get(ip).map(Vec::as_slice).unwrap_or_default()
    }

    /// Upserts (`Some`) or removes (`None`) one resource. Returns whether
    /// anything changed: re-feeding identical content is a no-op, so a
    /// source that re-lists everything does not cause a push.
    pub(crate) fn apply(
        &mut self,
        kind: Kind,
        name: Arc<str>,
        value: Option<Arc<Encoded>>,
    ) -> bool {
        let map = &mut self.resources[kind.index()];
        let previous = match value {
            Some(new) => {
                if map.get(&name).is_some_and(|old| old.version == new.version) {
                    return false;
                }
                for ip in new.ips.iter() {
                    let names = self.by_ip.entry(ip.clone()).or_default();
                    if !names.contains(&name) {
                        names.push(name.clone());
                    }
                }
                let previous = map.insert(name.clone(), new.clone());
                // Drop index entries for addresses the new content no
                // longer has.
                if let Some(old) = &previous {
                    for ip in old.ips.iter().filter(|ip| !new.ips.contains(ip)) {
                        unindex(&mut self.by_ip, ip, &name);
                    }
                }
                previous
            }
            None => {
                let Some(old) = map.remove(&name) else {
                    return false;
                };
                for ip in old.ips.iter() {
                    unindex(&mut self.by_ip, ip, &name);
                }
                Some(old)
            }
        };
        drop(previous);
        self.generation += 1;
        self.log.push_back(Change {
            generation: self.generation,
            kind,
            name,
        });
        // Never less than twice the resources: one update that touches
        // everything must not push every stream off the end of the log.
        let capacity = self.log_capacity();
        while self.log.len() > capacity {
            if let Some(dropped) = self.log.pop_front() {
                self.truncated_through = dropped.generation;
            }
        }
        true
    }

    /// The changes after generation `cursor`, or `None` when some of them
    /// are no longer in the log (the caller must reconcile in full).
    pub(crate) fn changes_since(&self, cursor: u64) -> Option<impl Iterator<Item = &Change>> {
        if cursor < self.truncated_through {
            return None;
        }
        let start = self.log.partition_point(|c| c.generation <= cursor);
        Some(self.log.range(start..))
    }
}

fn unindex(by_ip: &mut HashMap<NetIp, Vec<Arc<str>>>, ip: &NetIp, name: &Arc<str>) {
    if let Some(names) = by_ip.get_mut(ip) {
        names.retain(|n| n != name);
        if names.is_empty() {
            by_ip.remove(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshbox_proto::workload::{Address, Workload, address};

    fn workload(uid: &str, ip: [u8; 4], tag: &str) -> Arc<Encoded> {
        let a = Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: uid.into(),
                name: tag.into(),
                addresses: vec![ip.to_vec()],
                ..Default::default()
            })),
        };
        Arc::new(Encoded::address(uid.into(), &a))
    }

    #[test]
    fn log_and_ip_index_follow_changes() {
        let mut cache = Cache::new(3);
        let ip1 = NetIp::parse("/10.0.0.1").unwrap();
        let ip2 = NetIp::parse("/10.0.0.2").unwrap();
        assert!(cache.apply(
            Kind::Address,
            "a".into(),
            Some(workload("a", [10, 0, 0, 1], "x"))
        ));
        assert!(!cache.apply(
            Kind::Address,
            "a".into(),
            Some(workload("a", [10, 0, 0, 1], "x"))
        ));
        assert_eq!(cache.lookup_ip(&ip1), &[Arc::<str>::from("a")]);
        assert!(cache.apply(
            Kind::Address,
            "a".into(),
            Some(workload("a", [10, 0, 0, 2], "x"))
        ));
        assert!(cache.lookup_ip(&ip1).is_empty());
        assert_eq!(cache.lookup_ip(&ip2).len(), 1);
        assert_eq!(cache.changes_since(0).unwrap().count(), 2);
        assert_eq!(cache.changes_since(1).unwrap().count(), 1);
        assert!(cache.apply(Kind::Address, "a".into(), None));
        assert!(cache.lookup_ip(&ip2).is_empty());
        assert!(cache.apply(
            Kind::Address,
            "b".into(),
            Some(workload("b", [10, 0, 0, 2], "x"))
        ));
        // Capacity 3: generation 1 fell out of the log.
        assert!(cache.changes_since(0).is_none());
        assert_eq!(cache.changes_since(1).unwrap().count(), 3);
        assert_eq!(cache.generation(), 4);
    }
}
