//! `meshbox-cni`: the CNI plugin, chained after the cluster's primary CNI.
//! It tells the dataplane on this node about each new pod and returns only
//! once the pod is captured; see [`meshbox_dataplane::cni`].

fn main() {
    std::process::exit(meshbox_dataplane::cni::plugin::main());
}
