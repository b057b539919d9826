//! Label selection: matching selectors against labels, and the
//! (namespace, key, value) index that finds candidates without scanning
//! every pod, service or policy of a namespace.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{Key, MeshIndex};

pub(super) type Labels = BTreeMap<String, String>;

/// Whether every pair of an equality selector is present in `labels`.
pub(super) fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
}

/// Evaluates a full Kubernetes `LabelSelector` (`matchLabels` and
/// `matchExpressions`). An unknown operator is an error rather than a
/// silent match, so a typo cannot widen who is allowed.
pub(super) fn label_selector_matches(
    selector: &LabelSelector,
    labels: &Labels,
) -> Result<bool, String> {
    if let Some(ml) = &selector.match_labels
        && !selects(ml, labels)
    {
        return Ok(false);
    }
    for expr in selector.match_expressions.iter().flatten() {
        let values = expr.values.as_deref().unwrap_or_default();
        let value = labels.get(&expr.key);
        let ok = match expr.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => return Err(format!("unknown label selector operator {other:?}")),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// namespace → label key → label value → names.
#[derive(Default)]
pub(super) struct PairIndex {
    by_ns: HashMap<String, HashMap<String, HashMap<String, BTreeSet<String>>>>,
}

impl PairIndex {
    pub(super) fn insert(&mut self, ns: &str, key: &str, value: &str, name: &str) {
        // Look up before allocating: almost every pair is already there.
        // One hash per level when it is (no contains-then-get).
        match self.by_ns.get_mut(ns) {
            Some(keys) => insert_key(keys, key, value, name),
            None => {
                let mut keys = HashMap::new();
                insert_key(&mut keys, key, value, name);
                self.by_ns.insert(ns.to_string(), keys);
            }
        }
    }

    pub(super) fn remove(&mut self, ns: &str, key: &str, value: &str, name: &str) {
        let Some(keys) = self.by_ns.get_mut(ns) else {
            return;
        };
        if let Some(values) = keys.get_mut(key) {
            if let Some(names) = values.get_mut(value) {
                names.remove(name);
                if names.is_empty() {
                    values.remove(value);
                }
            }
            if values.is_empty() {
                keys.remove(key);
            }
        }
        if keys.is_empty() {
            self.by_ns.remove(ns);
        }
    }

    pub(super) fn get(&self, ns: &str, key: &str, value: &str) -> Option<&BTreeSet<String>> {
        self.by_ns.get(ns)?.get(key)?.get(value)
    }

    pub(super) fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.by_ns.keys().map(String::as_str)
    }

    /// Indexes a whole label map (every pair).
    pub(super) fn insert_all(&mut self, ns: &str, labels: &Labels, name: &str) {
        for (k, v) in labels {
            self.insert(ns, k, v, name);
        }
    }

    pub(super) fn remove_all(&mut self, ns: &str, labels: &Labels, name: &str) {
        for (k, v) in labels {
            self.remove(ns, k, v, name);
        }
    }

    /// Indexes a selector under its first pair only: anything it selects
    /// carries that pair, so looking up each of a target's labels finds it.
    pub(super) fn insert_selector(&mut self, ns: &str, selector: &Labels, name: &str) {
        if let Some((k, v)) = selector.iter().next() {
            self.insert(ns, k, v, name);
        }
    }

    pub(super) fn remove_selector(&mut self, ns: &str, selector: &Labels, name: &str) {
        if let Some((k, v)) = selector.iter().next() {
            self.remove(ns, k, v, name);
        }
    }

    /// Names indexed in `ns` under any of `labels`' pairs (selector
    /// candidates for an object with these labels; verify each).
    pub(super) fn candidates<'a>(
        &'a self,
        ns: &str,
        labels: &'a Labels,
    ) -> impl Iterator<Item = &'a String> + 'a {
        let keys = self.by_ns.get(ns);
        labels.iter().flat_map(move |(k, v)| {
            keys.and_then(|keys| keys.get(k))
                .and_then(|values| values.get(v))
                .into_iter()
                .flatten()
        })
    }
}

fn insert_key(
    keys: &mut HashMap<String, HashMap<String, BTreeSet<String>>>,
    key: &str,
    value: &str,
    name: &str,
) {
    match keys.get_mut(key) {
        Some(values) => insert_value(values, value, name),
        None => {
            let mut values = HashMap::new();
            insert_value(&mut values, value, name);
            keys.insert(key.to_string(), values);
        }
    }
}

fn insert_value(values: &mut HashMap<String, BTreeSet<String>>, value: &str, name: &str) {
    match values.get_mut(value) {
        Some(names) => {
            if !names.contains(name) {
                names.insert(name.to_string());
            }
        }
        None => {
            values.insert(value.to_string(), BTreeSet::from([name.to_string()]));
        }
    }
}

impl MeshIndex {
    /// Pods selected by an equality selector, in one namespace or (`None`)
    /// in all of them. An empty selector selects every pod in scope.
    pub(super) fn select_pods(&self, ns: Option<&str>, selector: &Labels) -> BTreeSet<Key> {
        let mut out = BTreeSet::new();
        match ns {
            Some(ns) => self.select_pods_in(ns, selector, &mut out),
            None => {
                if selector.is_empty() {
                    for (ns, names) in &self.pods_by_ns {
                        out.extend(names.iter().map(|n| Key::new(ns, n)));
                    }
                } else {
                    for ns in self.pod_labels.namespaces() {
                        self.select_pods_in(ns, selector, &mut out);
                    }
                }
            }
        }
        out
    }

    fn select_pods_in(&self, ns: &str, selector: &Labels, out: &mut BTreeSet<Key>) {
        if selector.is_empty() {
            if let Some(names) = self.pods_by_ns.get(ns) {
                out.extend(names.iter().map(|n| Key::new(ns, n)));
            }
            return;
        }
        // Walk the rarest pair's pods and check the rest.
        let mut smallest: Option<&BTreeSet<String>> = None;
        for (k, v) in selector {
            match self.pod_labels.get(ns, k, v) {
                None => return,
                Some(set) => {
                    if smallest.is_none_or(|s| set.len() < s.len()) {
                        smallest = Some(set);
                    }
                }
            }
        }
        for name in smallest.into_iter().flatten() {
            let key = Key::new(ns, name);
            if self
                .pods
                .get(&key)
                .is_some_and(|p| selects(selector, &p.labels))
            {
                out.insert(key);
            }
        }
    }
}
