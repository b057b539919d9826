//! `meshbox-cni`: the CNI plugin, chained after the cluster's primary CNI.
//! It tells the dataplane on this node about each new pod and returns only
//! once the pod is captured; see [`meshbox_cni::plugin`].
//!
//! Run with `install` or `uninstall` (never done by a runtime, which passes
//! no arguments) it puts itself into the node's CNI configuration or takes
//! itself out; see [`meshbox_cni::install`].

use meshbox_cni::{install, plugin};

fn main() {
    if install::is_management_command() {
        std::process::exit(install::main());
    }
    std::process::exit(plugin::main());
}
