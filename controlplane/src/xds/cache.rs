//! The server's current set of resources and a bounded log of what changed.
//!
//! The cache holds every resource once, already encoded ([`Encoded`]), plus
//! indexes for on-demand subscriptions: from IP address to the Address
//! resources that answer to it, from node to the workloads on it, and from
//! service to the workloads behind it.
//! Every change gets a generation number and a line in the change log;
//! streams remember the last generation they caught up with and read the
//! log from there. The log is bounded: a stream that falls further behind
//! than the log reaches is told so and reconciles against the whole cache
//! instead, so no per-update state ever accumulates for a slow client.
//!
//! The cache does no I/O and takes no locks itself; the server wraps it in
//! one `RwLock` whose critical sections are short and never span an await.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use super::resource::{Encoded, KINDS, Kind, NetIp};

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
    resources: [HashMap<Arc<str>, Arc<Encoded>>; KINDS],
    by_ip: HashMap<NetIp, Vec<Arc<str>>>,
    /// Node name → workloads on it.
    by_node: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// Service `namespace/hostname` → workloads that list it.
    by_service: HashMap<Arc<str>, HashSet<Arc<str>>>,
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
            by_node: HashMap::new(),
            by_service: HashMap::new(),
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

    /// Names of the workloads on `node`.
    pub(crate) fn on_node(&self, node: &str) -> impl Iterator<Item = &Arc<str>> {
        self.by_node.get(node).into_iter().flatten()
    }

    /// Names of the workloads that are endpoints of `service`
    /// (`namespace/hostname`).
    pub(crate) fn members(&self, service: &str) -> impl Iterator<Item = &Arc<str>> {
        self.by_service.get(service).into_iter().flatten()
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
                for key in new.node.iter() {
                    index_set(&mut self.by_node, key, &name);
                }
                for key in new.member_of.iter() {
                    index_set(&mut self.by_service, key, &name);
                }
                let previous = map.insert(name.clone(), new.clone());
                // Drop index entries the new content no longer has.
                if let Some(old) = &previous {
                    for ip in old.ips.iter().filter(|ip| !new.ips.contains(ip)) {
                        unindex(&mut self.by_ip, ip, &name);
                    }
                    for key in old.node.iter().filter(|n| new.node.as_ref() != Some(*n)) {
                        unindex_set(&mut self.by_node, key, &name);
                    }
                    for key in old.member_of.iter().filter(|s| !new.member_of.contains(s)) {
                        unindex_set(&mut self.by_service, key, &name);
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
                for key in old.node.iter() {
                    unindex_set(&mut self.by_node, key, &name);
                }
                for key in old.member_of.iter() {
                    unindex_set(&mut self.by_service, key, &name);
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

fn index_set(index: &mut HashMap<Arc<str>, HashSet<Arc<str>>>, key: &Arc<str>, name: &Arc<str>) {
    match index.get_mut(key) {
        Some(names) => {
            names.insert(name.clone());
        }
        None => {
            index.insert(key.clone(), HashSet::from([name.clone()]));
        }
    }
}

fn unindex_set(index: &mut HashMap<Arc<str>, HashSet<Arc<str>>>, key: &str, name: &str) {
    if let Some(names) = index.get_mut(key) {
        names.remove(name);
        if names.is_empty() {
            index.remove(key);
        }
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

    #[test]
    fn node_and_service_indexes_follow_changes() {
        let placed = |node: &str, services: &[&str]| {
            let a = Address {
                r#type: Some(address::Type::Workload(Workload {
                    uid: "w".into(),
                    node: node.into(),
                    services: services
                        .iter()
                        .map(|s| (s.to_string(), Default::default()))
                        .collect(),
                    ..Default::default()
                })),
            };
            Some(Arc::new(Encoded::address("w".into(), &a)))
        };
        let names = |it: &mut dyn Iterator<Item = &Arc<str>>| -> Vec<String> {
            it.map(|n| n.to_string()).collect()
        };
        let mut cache = Cache::new(10);
        cache.apply(Kind::Address, "w".into(), placed("n1", &["ns/a", "ns/b"]));
        assert_eq!(names(&mut cache.on_node("n1")), vec!["w"]);
        assert_eq!(names(&mut cache.members("ns/a")), vec!["w"]);
        cache.apply(Kind::Address, "w".into(), placed("n2", &["ns/b"]));
        assert!(names(&mut cache.on_node("n1")).is_empty());
        assert_eq!(names(&mut cache.on_node("n2")), vec!["w"]);
        assert!(names(&mut cache.members("ns/a")).is_empty());
        assert_eq!(names(&mut cache.members("ns/b")), vec!["w"]);
        cache.apply(Kind::Address, "w".into(), None);
        assert!(names(&mut cache.on_node("n2")).is_empty());
        assert!(names(&mut cache.members("ns/b")).is_empty());
        assert!(cache.by_node.is_empty() && cache.by_service.is_empty());
    }
}
